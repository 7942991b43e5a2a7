//! The monitoring files keep step with the worker:
//!
//! - every metric name in the Grafana dashboard's queries, the alerting
//!   rules and their unit tests is one a live worker exports on `/metrics`
//!   (counters with `_total`, histograms with `_bucket`/`_sum`/`_count`) or a
//!   documented RabbitMQ Prometheus plugin metric; a misspelled name, prefix
//!   or function fails;
//! - every metric the worker exports is on the dashboard or in the rules, or
//!   listed here with the reason it is not;
//! - the dashboard is an importable Grafana dashboard (datasource variable,
//!   stable uids, unique ids) and `deploy/README.md` describes every panel
//!   and alert;
//! - the plain rules file and the PrometheusRule hold the same groups, and the
//!   PrometheusRule validates against its schema (`deploy/schemas/`);
//! - where `promtool` is at hand (on `PATH`, or where `.ci/lint-deploy` puts
//!   it), it accepts both rules files, their unit tests and every dashboard
//!   query.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use crate::files::{load_json, read, repo_path, violations};
use jsonschema::{Draft, Resource, Validator};
use serde::Deserialize;
use serde_json::{json, Value};
use vidu_test_kit::{sim, TestEnv};

const DASHBOARD: &str = "deploy/grafana/vidu-worker.json";
const RULES: &str = "deploy/prometheus/vidu-worker.rules.yaml";
const PROMETHEUS_RULE: &str = "deploy/prometheus/prometheusrule.yaml";
const RULE_TESTS: &str = "deploy/prometheus/tests/vidu-worker.test.yaml";
const PROMETHEUS_RULE_SCHEMA: &str =
    "deploy/schemas/prometheus-operator/prometheusrule-monitoring-v1.json";
const K8S_DEFINITIONS: &str = "deploy/schemas/kubernetes/v1.33.0-local-strict/_definitions.json";
const K8S_DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";
/// Where `.ci/lint-deploy` extracts Debian's `prometheus` package.
const LINT_PROMTOOL: &str = "target/lint-deploy/prometheus/usr/bin/promtool";

/// RabbitMQ metrics the dashboard and the rules may use: the queue metrics of
/// the `rabbitmq_prometheus` plugin (RabbitMQ 3.10), as listed in the "Queues"
/// table of rabbitmq-server's `deps/rabbitmq_prometheus/metrics.md` and in
/// the plugin's `queue_coarse_metrics` and `queue_metrics` families. With a
/// `queue` label they come from `/metrics/per-object` (or `/metrics` with
/// `prometheus.return_per_object_metrics = true`); deploy/README.md says
/// which endpoint to scrape.
const RABBITMQ_METRICS: &[&str] = &[
    "rabbitmq_queue_consumer_capacity",
    "rabbitmq_queue_consumer_utilisation",
    "rabbitmq_queue_consumers",
    "rabbitmq_queue_disk_reads_total",
    "rabbitmq_queue_disk_writes_total",
    "rabbitmq_queue_head_message_timestamp",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_bytes",
    "rabbitmq_queue_messages_paged_out",
    "rabbitmq_queue_messages_paged_out_bytes",
    "rabbitmq_queue_messages_persistent",
    "rabbitmq_queue_messages_persistent_bytes",
    "rabbitmq_queue_messages_published_total",
    "rabbitmq_queue_messages_ram",
    "rabbitmq_queue_messages_ram_bytes",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_ready_bytes",
    "rabbitmq_queue_messages_ready_ram",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages_unacked_bytes",
    "rabbitmq_queue_messages_unacked_ram",
    "rabbitmq_queue_process_memory_bytes",
    "rabbitmq_queue_process_reductions_total",
    "rabbitmq_queues",
];

/// Exported metric families deliberately on neither the dashboard nor the
/// rules, and why. A new metric must go on the dashboard, in the rules, or
/// here.
const NOT_MONITORED: &[(&str, &str)] = &[
    (
        "vidu_worker_ticket_hops_total",
        "wait-queue hops follow from the tasks' durations; Tasks tracked shows the load",
    ),
    (
        "vidu_worker_quota_slots_unused_total",
        "a benign race between workers for one quota slot",
    ),
    (
        "vidu_worker_reply_failures_total",
        "a producer's reply_to problem; the events exchange had the event",
    ),
    (
        "vidu_worker_request_hold_seconds",
        "bounded by the create path; Request to terminal latency covers the user's view",
    ),
];

// ---------------------------------------------------------------------------
// PromQL metric names
// ---------------------------------------------------------------------------

/// PromQL functions and aggregation operators (Prometheus 2.x).
const PROMQL_FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count",
    "count_over_time",
    "count_values",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "end",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "start",
    "stddev",
    "stddev_over_time",
    "stdvar",
    "stdvar_over_time",
    "sum",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "topk",
    "vector",
    "year",
];

/// Aggregation operators, which may take `by (…)` before their argument.
const AGGREGATIONS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];

/// Keywords followed by a parenthesised label list, not an expression.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

/// The index just past the bracket that closes the one at `open`, skipping
/// quoted strings.
fn closing(chars: &[char], open: usize) -> Result<usize, String> {
    let (opening, close) = match chars[open] {
        '(' => ('(', ')'),
        '{' => ('{', '}'),
        '[' => ('[', ']'),
        other => return Err(format!("not a bracket: {other}")),
    };
    let mut depth = 0;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = past_string(chars, i)?,
            c if c == opening => {
                depth += 1;
                i += 1;
            }
            c if c == close => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => i += 1,
        }
    }
    Err(format!("unbalanced {opening}"))
}

/// The index just past the string literal that starts at `start`.
fn past_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return Ok(i + 1);
        }
        i += 1;
    }
    Err(format!("unterminated string {quote}"))
}

/// Removes Grafana variables (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`), which stand for label values, durations or intervals.
fn without_grafana_variables(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            if chars.get(i + 1) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The metric names a PromQL expression selects: every identifier that is not
/// a function, a keyword, a label name (in `{…}` or `by (…)`), a string, a
/// duration or a number. An identifier followed by `(` must be a known
/// function, so a misspelled function fails too.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let chars: Vec<char> = without_grafana_variables(expr).chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = past_string(&chars, i)?;
        } else if c == '{' || c == '[' {
            i = closing(&chars, i)?;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers, 1e3, 0x1f and durations (5m, 1h30m) alike.
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let rest: String = chars[next..].iter().take(8).collect();
            let grouped = ["by", "without"].iter().any(|k| {
                rest.strip_prefix(k)
                    .is_some_and(|r| r.starts_with(|c: char| c == '(' || c.is_whitespace()))
            });
            // `sum by (le) (…)` is an aggregation as much as `sum(…) by (le)`.
            let call =
                chars.get(next) == Some(&'(') || (grouped && AGGREGATIONS.contains(&word.as_str()));
            let lower = word.to_ascii_lowercase();
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if call {
                    i = closing(&chars, next)?;
                }
            } else if PROMQL_WORDS.contains(&lower.as_str()) {
            } else if call {
                if !PROMQL_FUNCTIONS.contains(&word.as_str()) {
                    return Err(format!("unknown PromQL function {word}()"));
                }
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// The names a worker's `/metrics` text defines: the samples it shows, and
/// for every `# TYPE` the names its samples take (so label sets not seen yet
/// count too).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut words = declared.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                panic!("odd TYPE line: {line}");
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" | "gaugehistogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                "summary" => {
                    for suffix in ["", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The family a sample name belongs to, as the worker's README names it:
/// histograms without their suffixes.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

// ---------------------------------------------------------------------------
// The files
// ---------------------------------------------------------------------------

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn dashboard() -> Value {
    load_json(DASHBOARD)
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .rev()
        .collect();
    while let Some(panel) = stack.pop() {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            stack.extend(nested.iter().rev());
        }
    }
    out
}

/// (where, PromQL) for every query of the dashboard: panel targets and the
/// metric argument of `label_values(metric, label)` variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_else(|| {
                panic!(
                    "{DASHBOARD}: panel {:?} has a target without expr",
                    panel["title"]
                )
            });
            out.push((
                format!(
                    "{DASHBOARD}: panel {:?} {}",
                    panel["title"], target["refId"]
                ),
                expr.to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_else(|| panic!("{DASHBOARD}: variable {} without query", variable["name"]));
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!("{DASHBOARD}: variable query {query:?} is not label_values(metric, label)")
            });
        if let Some((metric, _label)) = inner.rsplit_once(',') {
            out.push((
                format!("{DASHBOARD}: variable {}", variable["name"]),
                metric.trim().to_owned(),
            ));
        }
    }
    out
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Group {
    name: String,
    interval: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rule_file() -> RuleFile {
    serde_yaml::from_str(&read(RULES)).unwrap_or_else(|e| panic!("{RULES}: {e}"))
}

/// (where, PromQL) for every rule of the plain file and every input series of
/// the rules' unit tests.
fn rule_queries() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = rule_file()
        .groups
        .iter()
        .flat_map(|g| g.rules.iter())
        .map(|r| {
            let name = r
                .alert
                .clone()
                .or_else(|| r.record.clone())
                .unwrap_or_default();
            (format!("{RULES}: {name}"), r.expr.clone())
        })
        .collect();
    let tests = yaml(RULE_TESTS);
    for test in tests["tests"].as_array().expect("tests") {
        for series in test["input_series"].as_array().into_iter().flatten() {
            out.push((
                format!("{RULE_TESTS}: input series"),
                series["series"].as_str().expect("series").to_owned(),
            ));
        }
    }
    out
}

/// Every metric name of `queries` that `known` lacks, as "where: name".
fn unknown_names(queries: &[(String, String)], known: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (origin, expr) in queries {
        match metric_names(expr) {
            Ok(names) => problems.extend(
                names
                    .into_iter()
                    .filter(|n| !known.contains(n))
                    .map(|n| format!("{origin}: {n} is neither exported by the worker nor a documented RabbitMQ metric")),
            ),
            Err(e) => problems.push(format!("{origin}: {e} in {expr:?}")),
        }
    }
    problems
}

fn known_names(exported: &BTreeSet<String>) -> BTreeSet<String> {
    exported
        .iter()
        .cloned()
        .chain(RABBITMQ_METRICS.iter().map(|s| (*s).to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn metric_names_are_read_from_promql_and_typos_are_caught() {
    let names = |e: &str| metric_names(e).unwrap_or_else(|err| panic!("{e}: {err}"));
    let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le) (rate(vidu_worker_request_to_terminal_seconds_bucket{job=~"$job"}[$__rate_interval]))) > 900"#
        ),
        set(&["vidu_worker_request_to_terminal_seconds_bucket"])
    );
    assert_eq!(
        names(
            "max(vidu_worker_upstream_paused) == 1 unless on () max(vidu_worker_upstream_refusing_key)\n== 1 and sum without(instance) (x:recorded offset 5m) * 1e3 < +Inf"
        ),
        set(&["vidu_worker_upstream_paused", "vidu_worker_upstream_refusing_key", "x:recorded"])
    );
    assert_eq!(
        names(
            r#"sum(max by (queue) (rabbitmq_queue_messages{vhost="$vhost",queue=~`${request_queue:regex}\.wait\..+`}))"#
        ),
        set(&["rabbitmq_queue_messages"])
    );
    assert_eq!(
        names(r#"label_replace(up{a="{b}"}, "dst", "$1", "src", "(.*)")"#),
        set(&["up"])
    );
    assert!(metric_names("rat(vidu_worker_polls_total[5m])").is_err());
    assert!(metric_names("sum(vidu_worker_polls_total{a=\"b\"").is_err());

    // A misspelled name, or prefix, is reported against the real names.
    let exported = exported_names(&vidu_worker::metrics::Metrics::new().render());
    let known = known_names(&exported);
    for (typo, expr) in [
        (
            "vidu_worker_requests_recieved_total",
            "sum(rate(vidu_worker_requests_recieved_total[5m]))",
        ),
        (
            "vidu_wroker_tasks_tracked",
            "max(vidu_wroker_tasks_tracked)",
        ),
        ("viduworker_tasks_tracked", "viduworker_tasks_tracked > 0"),
        (
            "vidu_worker_request_to_terminal_seconds",
            "rate(vidu_worker_request_to_terminal_seconds[5m])",
        ),
        (
            "vidu_worker_untracked_tasks",
            "increase(vidu_worker_untracked_tasks[1h])",
        ),
        (
            "rabbitmq_queue_messages_unacknowledged",
            "rabbitmq_queue_messages_unacknowledged{queue=\"q\"}",
        ),
    ] {
        let problems = unknown_names(&[("sample".into(), expr.into())], &known);
        assert_eq!(problems.len(), 1, "{expr}: {problems:?}");
        assert!(problems[0].contains(typo), "{problems:?}");
    }
    let fine =
        "sum(rate(vidu_worker_requests_received_total[5m])) + max(vidu_worker_tasks_tracked)";
    assert!(unknown_names(&[("sample".into(), fine.into())], &known).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_use_only_metrics_that_exist() {
    let env = TestEnv::new("monitoring", sim(Duration::from_millis(100))).await;
    let worker = env.start_worker().await;
    let (status, exposition) = worker.get("/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    let exported = exported_names(&exposition);
    assert!(
        exported
            .iter()
            .filter(|n| n.starts_with("vidu_worker_"))
            .count()
            >= 20,
        "{exposition}"
    );
    let known = known_names(&exported);

    let dashboard_queries = dashboard_queries(&dashboard());
    let rule_queries = rule_queries();
    assert!(dashboard_queries.len() >= 20, "{dashboard_queries:?}");
    let mut problems = unknown_names(&dashboard_queries, &known);
    problems.extend(unknown_names(&rule_queries, &known));
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every exported family is watched somewhere, or said not to be.
    let used: BTreeSet<String> = dashboard_queries
        .iter()
        .chain(&rule_queries)
        .flat_map(|(_, e)| metric_names(e).expect("checked above"))
        .map(|n| family(&n).to_owned())
        .collect();
    let exported_families: BTreeSet<String> = exported
        .iter()
        .filter(|n| n.starts_with("vidu_worker_"))
        .map(|n| family(n).to_owned())
        .collect();
    let excused: BTreeSet<String> = NOT_MONITORED.iter().map(|(n, _)| (*n).to_owned()).collect();
    let unwatched: Vec<&String> = exported_families
        .iter()
        .filter(|f| !used.contains(*f) && !excused.contains(*f))
        .collect();
    assert!(
        unwatched.is_empty(),
        "exported but on neither the dashboard nor the rules (add them, or to NOT_MONITORED with a reason): {unwatched:?}"
    );
    let stale: Vec<&String> = excused
        .iter()
        .filter(|f| !exported_families.contains(*f) || used.contains(*f))
        .collect();
    assert!(
        stale.is_empty(),
        "NOT_MONITORED entries to remove: {stale:?}"
    );
}

#[test]
fn the_dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    assert_eq!(d["uid"], "vidu-worker", "a stable uid keeps links working");
    assert!(d["id"].is_null(), "no instance-specific id");
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(
        d.get("__inputs").is_none(),
        "the datasource is a variable, not an import input"
    );

    let variables = d["templating"]["list"].as_array().expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    assert_eq!(variable("vhost")["type"], "query");
    assert_eq!(variable("request_queue")["query"], "vidu.requests");
    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    for v in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds, "variable {}", v["name"]);
    }

    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let all = panels(&d);
    assert!(all.len() >= 15);
    for panel in &all {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("numeric id")),
            "duplicate id in {title}"
        );
        assert!(titles.insert(title), "duplicate title {title}");
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("x"),
            grid["w"].as_u64().expect("w"),
        );
        assert!(
            x + w <= 24 && grid["h"].as_u64().is_some_and(|h| h > 0),
            "{title}: {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], ds, "{title}");
        assert!(
            panel["description"].as_str().is_some_and(|s| s.len() > 20),
            "{title}: a description for the panel's info icon"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}");
        }
    }

    // The queue panels follow the deployment's names (README "Topology").
    let exprs: Vec<String> = dashboard_queries(&d).into_iter().map(|(_, e)| e).collect();
    for needle in [
        r#"queue="$request_queue""#,
        r#"queue="${request_queue}.tracking""#,
        r#"queue="${request_queue}.dead""#,
        r"${request_queue:regex}\.wait\.",
        r#"vhost="$vhost""#,
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(needle)),
            "no query uses {needle}"
        );
    }
    for family in [
        "vidu_worker_requests_received_total",
        "vidu_worker_upstream_calls_total",
        "vidu_worker_create_rate_permitted",
        "vidu_worker_tasks_tracked",
        "vidu_worker_request_to_terminal_seconds_bucket",
        "vidu_worker_events_published_total",
        "vidu_worker_broker_connected",
        "vidu_worker_upstream_refusing_key",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(family)),
            "the dashboard lacks {family}"
        );
    }
}

#[test]
fn the_deploy_readme_describes_every_panel_and_alert() {
    let readme = read("deploy/README.md");
    let d = dashboard();
    for panel in panels(&d) {
        let title = panel["title"].as_str().expect("title");
        let marked = if panel["type"] == "row" {
            format!("*{title}*")
        } else {
            format!("**{title}**")
        };
        assert!(
            readme.contains(&marked),
            "deploy/README.md does not describe the panel {marked}"
        );
    }
    for rule in rule_file().groups.iter().flat_map(|g| &g.rules) {
        let alert = rule.alert.as_deref().expect("alerting rules only");
        assert!(
            readme.contains(&format!("`{alert}`")),
            "deploy/README.md does not mention the alert `{alert}`"
        );
    }
    for file in [DASHBOARD, RULES, PROMETHEUS_RULE, RULE_TESTS] {
        let rel = file.strip_prefix("deploy/").expect("under deploy/");
        assert!(
            readme.contains(rel),
            "deploy/README.md does not mention {rel}"
        );
    }
}

#[test]
fn the_rules_are_well_formed_and_cover_the_readme_alerts() {
    let file = rule_file();
    let duration = |s: &str| humantime::parse_duration(s).is_ok() || s == "0";
    let mut alerts = BTreeSet::new();
    let mut groups = BTreeSet::new();
    for group in &file.groups {
        assert!(
            groups.insert(group.name.as_str()),
            "duplicate group {}",
            group.name
        );
        assert!(!group.rules.is_empty(), "{}", group.name);
        for rule in &group.rules {
            let alert = rule
                .alert
                .as_deref()
                .unwrap_or_else(|| panic!("{rule:?}: not an alert"));
            assert!(rule.record.is_none(), "{alert}");
            assert!(alerts.insert(alert), "duplicate alert {alert}");
            assert!(alert.starts_with("ViduWorker"), "{alert}");
            let severity = rule.labels.get("severity").map(String::as_str);
            assert!(
                matches!(severity, Some("critical" | "warning")),
                "{alert}: severity {severity:?}"
            );
            for key in ["summary", "description"] {
                assert!(
                    rule.annotations
                        .get(key)
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{alert}: no {key}"
                );
            }
            for d in rule.for_.iter().chain(&rule.keep_firing_for) {
                assert!(duration(d), "{alert}: duration {d:?}");
            }
        }
        if let Some(interval) = &group.interval {
            assert!(duration(interval), "{}: interval {interval:?}", group.name);
        }
    }
    // The brief's conditions: not ready, key or balance refused, dead
    // letters growing, upstream errors, latency, untracked tasks.
    for wanted in [
        "ViduWorkerNotReady",
        "ViduWorkerUpstreamKeyRefused",
        "ViduWorkerDeadLettersGrowing",
        "ViduWorkerUpstreamErrors",
        "ViduWorkerSlowEndToEnd",
        "ViduWorkerUntrackedTask",
    ] {
        assert!(alerts.contains(wanted), "no {wanted}");
    }

    // Every metric the README's "Alerts worth having" table alerts on is in a
    // rule.
    let readme = read("README.md");
    let table = readme
        .split("### Alerts worth having")
        .nth(1)
        .and_then(|rest| rest.split("\n#").next())
        .expect("README.md has an \"Alerts worth having\" section");
    let in_rules: BTreeSet<String> = file
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .flat_map(|r| metric_names(&r.expr).expect("PromQL"))
        .collect();
    let mut readme_metrics = BTreeSet::new();
    for row in table.lines().filter(|l| l.starts_with('|')) {
        for (i, cell) in row.split('`').enumerate() {
            if i % 2 == 1 {
                if let Ok(names) = metric_names(&cell.replace("\\|", "|")) {
                    readme_metrics.extend(
                        names.into_iter().filter(|n| {
                            n.starts_with("vidu_worker_") || n.starts_with("rabbitmq_")
                        }),
                    );
                }
            }
        }
    }
    assert!(readme_metrics.len() >= 8, "{readme_metrics:?}");
    let missing: Vec<&String> = readme_metrics.difference(&in_rules).collect();
    assert!(
        missing.is_empty(),
        "README alerts on {missing:?}, the rules do not"
    );
}

/// An edit that makes a document invalid.
type Breaking = fn(&mut Value);

#[test]
fn the_prometheus_rule_holds_the_rules_file_and_matches_its_schema() {
    let plain = yaml(RULES);
    let resource = yaml(PROMETHEUS_RULE);
    assert_eq!(
        resource["spec"]["groups"], plain["groups"],
        "{PROMETHEUS_RULE} spec.groups must be {RULES} groups, unchanged"
    );

    let definitions =
        Resource::from_contents(load_json(K8S_DEFINITIONS)).expect("definitions are a resource");
    let validator: Validator = jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(false)
        .with_resource(K8S_DEFINITIONS_URI, definitions)
        .build(&load_json(PROMETHEUS_RULE_SCHEMA))
        .unwrap_or_else(|e| panic!("{PROMETHEUS_RULE_SCHEMA} does not compile: {e}"));
    let problems = violations(&validator, &resource);
    assert!(
        problems.is_empty(),
        "{PROMETHEUS_RULE}:\n{}",
        problems.join("\n")
    );

    // The schema is not vacuous: each of these breaks it.
    let broken: &[(&str, Breaking)] = &[
        ("unknown top-level field", |v| v["status"] = json!({})),
        ("wrong kind", |v| v["kind"] = json!("PrometheusRules")),
        ("unknown group field", |v| {
            v["spec"]["groups"][0]["evaluation"] = json!("1m")
        }),
        ("group without name", |v| {
            v["spec"]["groups"][0]
                .as_object_mut()
                .expect("group")
                .remove("name");
        }),
        ("rule without expr", |v| {
            v["spec"]["groups"][0]["rules"][0]
                .as_object_mut()
                .expect("rule")
                .remove("expr");
        }),
        ("alert and record", |v| {
            v["spec"]["groups"][0]["rules"][0]["record"] = json!("x:y")
        }),
        ("bad duration", |v| {
            v["spec"]["groups"][0]["rules"][0]["for"] = json!("5 minutes")
        }),
        ("numeric label", |v| {
            v["spec"]["groups"][0]["rules"][0]["labels"]["team"] = json!(7)
        }),
        ("misspelled field", |v| {
            let rule = v["spec"]["groups"][0]["rules"][0]
                .as_object_mut()
                .expect("rule");
            let annotations = rule.remove("annotations").expect("annotations");
            rule.insert("annotation".into(), annotations);
        }),
        ("metadata without name", |v| {
            v["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("name");
        }),
    ];
    for (what, breaking) in broken {
        let mut doc = resource.clone();
        breaking(&mut doc);
        assert!(
            validator.validate(&doc).is_err(),
            "the schema accepts a PrometheusRule with {what}"
        );
    }
    // An integer expr and a recording rule are valid, as in the CRD.
    let mut doc = resource.clone();
    doc["spec"]["groups"][0]["rules"] = json!([{"record": "vidu:up", "expr": 1}]);
    assert!(
        validator.validate(&doc).is_ok(),
        "{:?}",
        violations(&validator, &doc)
    );
}

/// `promtool` on `PATH`, or where `.ci/lint-deploy` extracts it.
fn promtool() -> Option<PathBuf> {
    let local = repo_path(LINT_PROMTOOL);
    if local.is_file() {
        return Some(local);
    }
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("promtool"))
}

fn run_promtool(promtool: &PathBuf, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo_path("."))
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_every_dashboard_query() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "skipped: promtool not found (on PATH or {LINT_PROMTOOL}; .ci/lint-deploy installs it)"
        );
        return;
    };
    run_promtool(&promtool, &["check", "rules", RULES]);
    run_promtool(&promtool, &["test", "rules", RULE_TESTS]);

    let dir =
        std::env::temp_dir().join(format!("vidu-monitoring-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let write = |name: &str, value: &Value| {
        let path = dir.join(name);
        std::fs::write(&path, serde_yaml::to_string(value).expect("yaml")).expect("write");
        path.to_string_lossy().into_owned()
    };
    let operator_groups = write(
        "prometheusrule-groups.yaml",
        &json!({"groups": yaml(PROMETHEUS_RULE)["spec"]["groups"]}),
    );
    run_promtool(&promtool, &["check", "rules", &operator_groups]);

    // Every dashboard query, with its Grafana variables filled in, as a
    // recording rule: promtool parses each one.
    let rules: Vec<Value> = dashboard_queries(&dashboard())
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let filled = expr
                .replace("$__rate_interval", "5m")
                .replace("${request_queue:regex}", r"vidu\.requests")
                .replace("${request_queue}", "vidu.requests")
                .replace("$request_queue", "vidu.requests")
                .replace("$vhost", "/")
                .replace("$job", ".+");
            assert!(!filled.contains('$'), "unfilled variable in {expr}");
            json!({"record": format!("dashboard:query_{i}"), "expr": filled})
        })
        .collect();
    let dashboard_rules = write(
        "dashboard.yaml",
        &json!({"groups": [{"name": "dashboard", "rules": rules}]}),
    );
    run_promtool(&promtool, &["check", "rules", &dashboard_rules]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's metrics table lists every value each label can take.
#[test]
fn the_readme_lists_every_label_value() {
    use vidu_worker::metrics::{
        CreateOutcome, PollResult, RequestOutcome, TicketRejection, WaitReason,
    };
    let readme = read("README.md");
    let row = |metric: &str| {
        readme
            .lines()
            .find(|l| l.starts_with(&format!("| `vidu_worker_{metric}")))
            .unwrap_or_else(|| panic!("no README row for {metric}"))
            .to_owned()
    };
    let rejected: Vec<&str> = TicketRejection::ALL
        .iter()
        // Kept for a worker holding the key, never rejected: counted in
        // tickets_unverified_total.
        .filter(|r| **r != TicketRejection::Unverified)
        .map(|r| r.as_str())
        .collect();
    let labels: [(&str, Vec<&str>); 5] = [
        (
            "requests_received_total",
            RequestOutcome::ALL.iter().map(|v| v.as_str()).collect(),
        ),
        (
            "creates_total",
            CreateOutcome::ALL.iter().map(|v| v.as_str()).collect(),
        ),
        (
            "polls_total",
            PollResult::ALL.iter().map(|v| v.as_str()).collect(),
        ),
        (
            "create_waits_total",
            WaitReason::ALL.iter().map(|v| v.as_str()).collect(),
        ),
        ("tickets_rejected_total", rejected),
    ];
    for (metric, values) in labels {
        let row = row(metric);
        for value in values {
            assert!(
                row.contains(&format!("`{value}`")),
                "the README's row for vidu_worker_{metric} does not list `{value}`"
            );
        }
    }
}
