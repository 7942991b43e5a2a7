//! Static validation of the container and deployment files, so a broken
//! manifest fails `cargo test` rather than a rollout:
//!
//! - every Kubernetes manifest in `deploy/kubernetes/` validates against the
//!   official JSON Schema of its `apiVersion`/`kind` (vendored in
//!   `deploy/schemas/`, see its README); unknown kinds are failures;
//! - `deploy/docker-compose.yml` validates against the Compose Specification;
//! - the files agree with each other and with the worker's own configuration
//!   loader (queue names, ports, grace periods, secret keys, selectors);
//! - the Dockerfile keeps the image contract (entrypoint, port, user, config
//!   location, a healthcheck that works without curl), and its healthcheck
//!   command really works against a running worker.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use crate::files::{load_json, read, repo_path, violations};
use jsonschema::{Draft, Resource, Validator};
use serde::Deserialize;
use serde_json::{json, Value};
use vidu_worker::config::{Settings, API_KEY_ENV, DEFAULT_FILE};

pub(crate) const KUBERNETES_DIR: &str = "deploy/kubernetes";
const COMPOSE_FILE: &str = "deploy/docker-compose.yml";
/// Official Kubernetes schemas (kubernetes-json-schema, "local-strict").
const K8S_SCHEMA_DIR: &str = "deploy/schemas/kubernetes/v1.33.0-local-strict";
/// Where the per-kind Kubernetes schemas expect their shared definitions.
const K8S_DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";
/// Schemas for KEDA's custom resources (written from KEDA's documentation).
const KEDA_SCHEMA_DIR: &str = "deploy/schemas/keda";
/// Schemas for the RabbitMQ operators' custom resources (written from their
/// documentation and published CRDs).
pub(crate) const RABBITMQ_SCHEMA_DIR: &str = "deploy/schemas/rabbitmq-operators";
const COMPOSE_SCHEMA: &str = "deploy/schemas/compose-spec.json";
/// The non-root user of the image (Dockerfile `USER`).
const IMAGE_UID: i64 = 10001;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Every document of a (multi-document) YAML text, empty documents skipped.
pub(crate) fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// One Kubernetes object and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Manifest {
    pub(crate) origin: String,
    pub(crate) doc: Value,
}

impl Manifest {
    pub(crate) fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }
    pub(crate) fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }
}

fn manifests() -> Vec<Manifest> {
    manifests_in(KUBERNETES_DIR)
}

/// The manifests of the `*.yaml` files directly in `dir` (subdirectories are
/// variants with tests of their own).
pub(crate) fn manifests_in(dir: &str) -> Vec<Manifest> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.is_dir())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        assert!(
            name.ends_with(".yaml"),
            "{dir}/{name}: manifests are *.yaml (anything else is not checked)"
        );
        let rel = format!("{dir}/{name}");
        for (i, doc) in yaml_documents(&read(&rel), &rel).into_iter().enumerate() {
            out.push(Manifest {
                origin: format!("{rel}#{i}"),
                doc,
            });
        }
    }
    out
}

/// The one manifest of `kind`.
pub(crate) fn the(manifests: &[Manifest], kind: &str) -> Manifest {
    let found: Vec<&Manifest> = manifests.iter().filter(|m| m.kind() == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0].clone()
}

/// The schema file for an `apiVersion`/`kind`, named the way
/// kubernetes-json-schema names them: `<kind>-<group>-<version>.json` (group
/// = its first DNS label, none for the core group). Unknown kinds are errors:
/// a manifest nobody can validate must not slip through.
pub(crate) fn schema_file_for(api_version: &str, kind: &str) -> Result<String, String> {
    if api_version.is_empty() || kind.is_empty() {
        return Err("a manifest without apiVersion or kind".into());
    }
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group.split('.').next().unwrap_or(group), version),
        None => ("", api_version),
    };
    let file = if group.is_empty() {
        format!("{}-{version}.json", kind.to_lowercase())
    } else {
        format!("{}-{group}-{version}.json", kind.to_lowercase())
    };
    [K8S_SCHEMA_DIR, KEDA_SCHEMA_DIR, RABBITMQ_SCHEMA_DIR]
        .iter()
        .map(|dir| format!("{dir}/{file}"))
        .find(|rel| repo_path(rel).is_file())
        .ok_or_else(|| {
            format!("no schema for {api_version} {kind} ({file}): vendor one into deploy/schemas/")
        })
}

static K8S_DEFINITIONS: LazyLock<Value> =
    LazyLock::new(|| load_json(&format!("{K8S_SCHEMA_DIR}/_definitions.json")));

/// Compiles a manifest schema with the Kubernetes definitions registered
/// under the URI the schemas reference, once per schema. Formats (`int32`,
/// `int-or-string`) are annotations there, as for the API server's own
/// validation.
fn manifest_validator(schema_rel: &str) -> Arc<Validator> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Validator>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    cache
        .entry(schema_rel.to_owned())
        .or_insert_with(|| {
            let definitions = Resource::from_contents(K8S_DEFINITIONS.clone())
                .expect("definitions are a resource");
            let validator = jsonschema::options()
                .with_draft(Draft::Draft202012)
                .should_validate_formats(false)
                .with_resource(K8S_DEFINITIONS_URI, definitions)
                .build(&load_json(schema_rel))
                .unwrap_or_else(|e| panic!("{schema_rel} does not compile: {e}"));
            Arc::new(validator)
        })
        .clone()
}

/// Validates one manifest against the schema of its kind.
pub(crate) fn validate_manifest(doc: &Value) -> Result<(), Vec<String>> {
    let schema = schema_file_for(
        doc["apiVersion"].as_str().unwrap_or_default(),
        doc["kind"].as_str().unwrap_or_default(),
    )
    .map_err(|e| vec![e])?;
    let problems = violations(&manifest_validator(&schema), doc);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn compose() -> Value {
    let docs = yaml_documents(&read(COMPOSE_FILE), COMPOSE_FILE);
    assert_eq!(docs.len(), 1, "{COMPOSE_FILE} is one document");
    docs.into_iter().next().unwrap_or_default()
}

fn compose_validator() -> Validator {
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .with_base_uri("https://compose-spec.io/schemas/")
        .should_validate_formats(false)
        .build(&load_json(COMPOSE_SCHEMA))
        .unwrap_or_else(|e| panic!("{COMPOSE_SCHEMA} does not compile: {e}"))
}

/// Loads the worker's settings exactly as the binary would: the shipped
/// defaults file, an optional extra file, and an environment.
pub(crate) fn load_settings(extra_toml: Option<&str>, env: &HashMap<String, String>) -> Settings {
    let extra = extra_toml.map(|text| {
        let path = std::env::temp_dir().join(format!(
            "vidu-worker-deploy-test-{}.toml",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, text).expect("write temp config");
        path
    });
    let result = Settings::load_with_env(&repo_path(DEFAULT_FILE), extra.as_deref(), env);
    if let Some(path) = &extra {
        let _ = std::fs::remove_file(path);
    }
    result.unwrap_or_else(|e| panic!("the worker would refuse this configuration: {e}"))
}

/// A `--key value` option of an argument list.
pub(crate) fn option_value<'a>(args: &'a [String], option: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == option)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

pub(crate) fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn port_of(listen: &str) -> u16 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {listen:?}"))
}

/// `35s`, `1m30s` (compose durations) in seconds.
fn compose_duration_secs(text: &str) -> u64 {
    humantime_secs(text).unwrap_or_else(|| panic!("not a duration: {text:?}"))
}

fn humantime_secs(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            let n: u64 = number.parse().ok()?;
            number.clear();
            total += n * match c {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => return None,
            };
        }
    }
    number.is_empty().then_some(total)
}

pub(crate) fn is_subset(labels: &Value, of: &Value) -> bool {
    labels
        .as_object()
        .is_some_and(|l| !l.is_empty() && l.iter().all(|(k, v)| of.get(k) == Some(v)))
}

// ---------------------------------------------------------------------------
// Official schemas
// ---------------------------------------------------------------------------

#[test]
fn every_kubernetes_manifest_matches_its_official_schema() {
    let all = manifests();
    let mut problems = Vec::new();
    for m in &all {
        if let Err(errors) = validate_manifest(&m.doc) {
            for e in errors {
                problems.push(format!("{} ({} {}): {e}", m.origin, m.kind(), m.name()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let kinds: BTreeSet<&str> = all.iter().map(Manifest::kind).collect();
    for kind in [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ScaledObject",
        "Secret",
        "Service",
        "TriggerAuthentication",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {KUBERNETES_DIR}");
    }
}

#[test]
fn the_network_policy_admits_only_prometheus_to_the_workers_port() {
    let all = manifests();
    let policy = the(&all, "NetworkPolicy").doc;
    let deployment = the(&all, "Deployment").doc;
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"], *pod_labels,
        "it selects the workers' pods"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    assert_eq!(rules.len(), 1, "one way in");
    let ports = rules[0]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    let named = ports[0]["port"].as_str().expect("a named port");
    let container_ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    let declared: Vec<&str> = container_ports
        .as_array()
        .expect("container ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(declared, [named], "the operations port, and nothing else");
    let from = rules[0]["from"].as_array().expect("sources");
    assert!(
        !from.is_empty() && from.iter().all(|f| f.get("podSelector").is_some()),
        "only selected pods (never everyone): {from:?}"
    );
}

#[test]
fn unknown_kinds_are_failures() {
    assert!(schema_file_for("example.com/v1", "Widget").is_err());
    assert!(schema_file_for("apps/v1beta1", "Deployment").is_err());
    assert!(schema_file_for("", "Deployment").is_err());
    assert!(validate_manifest(&json!({"kind": "ConfigMap"})).is_err());
    assert_eq!(
        schema_file_for("apps/v1", "Deployment").as_deref(),
        Ok("deploy/schemas/kubernetes/v1.33.0-local-strict/deployment-apps-v1.json")
    );
    assert_eq!(
        schema_file_for("keda.sh/v1alpha1", "ScaledObject").as_deref(),
        Ok("deploy/schemas/keda/scaledobject-keda-v1alpha1.json")
    );
}

/// The validators are not vacuous: typical mistakes in each manifest are
/// caught.
#[test]
fn schemas_catch_broken_manifests() {
    let all = manifests();
    let deployment = the(&all, "Deployment").doc;
    let scaled = the(&all, "ScaledObject").doc;
    let auth = the(&all, "TriggerAuthentication").doc;
    let pdb = the(&all, "PodDisruptionBudget").doc;

    type Break = fn(&mut Value);
    let cases: Vec<(&str, &Value, Break)> = vec![
        ("a typo in a Deployment field", &deployment, |d| {
            d["spec"]["replica"] = json!(2);
        }),
        ("a container port as a string", &deployment, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                json!("9090");
        }),
        ("a probe without an action field", &deployment, |d| {
            d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
                .as_object_mut()
                .expect("httpGet")
                .remove("port");
        }),
        ("env with valueFrom misspelt", &deployment, |d| {
            let env = &mut d["spec"]["template"]["spec"]["containers"][0]["env"][0];
            let from = env["valueFrom"].take();
            env.as_object_mut().expect("env").remove("valueFrom");
            env["valuefrom"] = from;
        }),
        ("a Deployment without a selector", &deployment, |d| {
            d["spec"].as_object_mut().expect("spec").remove("selector");
        }),
        ("a PDB with maxUnavailable as a list", &pdb, |d| {
            d["spec"]["maxUnavailable"] = json!([1]);
        }),
        ("a KEDA trigger value that is a number", &scaled, |d| {
            d["spec"]["triggers"][0]["metadata"]["value"] = json!(32);
        }),
        ("a rabbitmq trigger without queueName", &scaled, |d| {
            d["spec"]["triggers"][0]["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("queueName");
        }),
        ("a rabbitmq trigger with an unknown mode", &scaled, |d| {
            d["spec"]["triggers"][0]["metadata"]["mode"] = json!("Length");
        }),
        (
            "a rabbitmq trigger with neither host nor authentication",
            &scaled,
            |d| {
                d["spec"]["triggers"][0]
                    .as_object_mut()
                    .expect("trigger")
                    .remove("authenticationRef");
            },
        ),
        ("a typo in the ScaledObject spec", &scaled, |d| {
            d["spec"]["maxReplicas"] = json!(3);
        }),
        ("an HPA policy value that is not a number", &scaled, |d| {
            d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
                ["policies"][0]["value"] = json!("one");
        }),
        ("a secret reference without a key", &auth, |d| {
            d["spec"]["secretTargetRef"][0]
                .as_object_mut()
                .expect("ref")
                .remove("key");
        }),
    ];
    for (label, original, break_it) in cases {
        let mut broken = original.clone();
        break_it(&mut broken);
        assert_ne!(&broken, original, "{label}: the mutation changed nothing");
        assert!(validate_manifest(&broken).is_err(), "{label}: not caught");
    }
}

#[test]
fn compose_file_matches_the_compose_spec() {
    let validator = compose_validator();
    let doc = compose();
    let problems = violations(&validator, &doc);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let mut broken = doc.clone();
    broken["services"]["worker-1"]["depends_on"]["rabbitmq"]["condition"] = json!("healthy");
    assert!(!validator.is_valid(&broken), "a bad depends_on condition");
    let mut broken = doc.clone();
    broken["services"]["worker-1"]["healthchek"] = json!({"test": ["NONE"]});
    assert!(!validator.is_valid(&broken), "a typo in a service key");
    let mut broken = doc;
    broken["services"]["rabbitmq"]["ports"] = json!("5672:5672");
    assert!(!validator.is_valid(&broken), "ports as a string");
}

// ---------------------------------------------------------------------------
// Consistency across files and with the worker's configuration
// ---------------------------------------------------------------------------

#[test]
fn kubernetes_files_agree_with_each_other_and_the_worker() {
    let all = manifests();
    let deployment = the(&all, "Deployment");
    let config_map = the(&all, "ConfigMap");
    let secret = the(&all, "Secret");
    let scaled = the(&all, "ScaledObject");
    let auth = the(&all, "TriggerAuthentication");
    let pdb = the(&all, "PodDisruptionBudget");
    let service = the(&all, "Service");

    let spec = &deployment.doc["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    let container = &containers[0];
    assert_eq!(spec["replicas"], 2);
    assert!(is_subset(&spec["selector"]["matchLabels"], pod_labels));
    assert!(is_subset(
        &pdb.doc["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert!(is_subset(&service.doc["spec"]["selector"], pod_labels));

    // The secret example: clearly an example, with the keys everyone reads.
    assert!(
        secret.origin.contains("example"),
        "the Secret ships as an example file"
    );
    let secret_data = secret.doc["stringData"].as_object().expect("stringData");
    assert!(
        secret_data
            .values()
            .all(|v| v.as_str().is_some_and(|s| s.contains("replace"))),
        "secret example values are placeholders"
    );

    // The container's environment, secrets filled in from the example.
    let mut env = HashMap::new();
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else {
            let reference = &var["valueFrom"]["secretKeyRef"];
            assert_eq!(reference["name"], secret.name(), "{name}: the Secret");
            let key = reference["key"].as_str().expect("secret key");
            secret_data
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{name}: the Secret has no key {key}"))
                .to_owned()
        };
        env.insert(name, value);
    }
    assert!(
        env.contains_key(API_KEY_ENV),
        "the API key comes from the Secret"
    );
    assert!(
        env.contains_key("VIDU_WORKER__AMQP__URL"),
        "the broker URL comes from the Secret"
    );

    // The ConfigMap is mounted and passed with --config ...
    let args = strings(&container["args"]);
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let config_path = option_value(&args, "--config").expect("--config FILE");
    let (mount_dir, file) = config_path.rsplit_once('/').expect("an absolute path");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == mount_dir)
        .unwrap_or_else(|| panic!("nothing mounted at {mount_dir}"));
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], config_map.name());
    let item = volume["configMap"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["path"] == file)
        .unwrap_or_else(|| panic!("no item projected to {file}"));
    let key = item["key"].as_str().expect("item key");
    let config_text = config_map.doc["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no key {key}"));

    // ... and the worker accepts the whole thing, exactly as in the pod.
    let settings = load_settings(Some(config_text), &env);
    let listen_port = settings.listen_addr().expect("http.listen").port();

    // Ports: config = container = probes = Service = scrape annotation.
    let ports = container["ports"].as_array().expect("ports");
    let named: BTreeMap<&str, i64> = ports
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["containerPort"].as_i64()?)))
        .collect();
    let resolve = |port: &Value| -> i64 {
        port.as_i64()
            .or_else(|| port.as_str().and_then(|n| named.get(n).copied()))
            .unwrap_or_else(|| panic!("port {port} names no container port"))
    };
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], i64::from(listen_port));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            resolve(&get["port"]),
            i64::from(listen_port),
            "{probe} port"
        );
    }
    let service_port = &service.doc["spec"]["ports"][0];
    assert_eq!(resolve(&service_port["targetPort"]), i64::from(listen_port));
    assert_eq!(
        spec["template"]["metadata"]["annotations"]["prometheus.io/port"],
        listen_port.to_string()
    );

    // Shutdown: Kubernetes waits longer than the worker's grace period.
    let termination = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let grace = settings.shutdown.grace_period;
    assert!(
        Duration::from_secs(termination) > grace,
        "terminationGracePeriodSeconds {termination} must exceed shutdown.grace_period {grace:?}"
    );

    // Small, locked-down pods.
    let resources = &container["resources"];
    assert!(resources["requests"]["memory"].is_string());
    assert!(resources["requests"]["cpu"].is_string());
    assert!(resources["limits"]["memory"].is_string());
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], IMAGE_UID);

    // KEDA scales this Deployment on this worker's request queue.
    let target = &scaled.doc["spec"]["scaleTargetRef"];
    assert_eq!(target["name"], deployment.name());
    assert_eq!(target["kind"], "Deployment");
    let triggers = scaled.doc["spec"]["triggers"].as_array().expect("triggers");
    assert_eq!(triggers.len(), 1, "one trigger: the request backlog");
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["queueName"], settings.amqp.request_queue,
        "KEDA watches the request queue the workers consume"
    );
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    assert_eq!(
        trigger["metadata"]["value"],
        settings.amqp.prefetch.to_string(),
        "ready requests per replica = what one worker holds (amqp.prefetch)"
    );
    assert_eq!(trigger["authenticationRef"]["name"], auth.name());
    let min = scaled.doc["spec"]["minReplicaCount"].as_i64().expect("min");
    let max = scaled.doc["spec"]["maxReplicaCount"].as_i64().expect("max");
    assert!(
        min >= 1,
        "tracking tickets need at least one live worker: minReplicaCount >= 1"
    );
    assert!(min <= max && max >= 2);
    for reference in auth.doc["spec"]["secretTargetRef"]
        .as_array()
        .expect("secretTargetRef")
    {
        assert_eq!(reference["name"], secret.name());
        let key = reference["key"].as_str().expect("key");
        assert!(secret_data.contains_key(key), "the Secret has no key {key}");
    }
    assert!(
        auth.doc["spec"]["secretTargetRef"]
            .as_array()
            .is_some_and(|refs| refs.iter().any(|r| r["parameter"] == "host")),
        "the scaler's host (broker URL) comes from the Secret"
    );
}

#[test]
fn compose_file_agrees_with_itself_and_the_worker() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    let rabbitmq = &services["rabbitmq"];
    assert_eq!(rabbitmq["image"], "rabbitmq:3.10-management");
    assert!(strings(&rabbitmq["ports"])
        .iter()
        .any(|p| p.ends_with(":15672")));
    let broker_user = rabbitmq["environment"]["RABBITMQ_DEFAULT_USER"]
        .as_str()
        .expect("a broker user (guest cannot log in remotely)");
    let broker_pass = rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"]
        .as_str()
        .expect("a broker password");

    let simulator = &services["simulator"];
    let sim_args = strings(&simulator["command"]);
    assert_eq!(sim_args.first().map(String::as_str), Some("simulate"));
    let sim_listen = option_value(&sim_args, "--listen").expect("simulate --listen");
    assert!(
        sim_listen.starts_with("0.0.0.0:"),
        "reachable from other containers"
    );
    let sim_key = simulator["environment"]["SIMULATOR_API_KEY"]
        .as_str()
        .expect("the simulator's key");

    let workers: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| strings(&s["command"]).first().map(String::as_str) == Some("run"))
        .collect();
    assert_eq!(workers.len(), 2, "two workers");
    let mut host_ports = BTreeSet::new();
    for (name, worker) in workers {
        let env: HashMap<String, String> = worker["environment"]
            .as_object()
            .expect("environment as a map")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_owned()))
            .collect();
        // The worker's own loader accepts the environment (unknown keys
        // would be refused).
        let settings = load_settings(None, &env);
        assert_eq!(
            settings.upstream.base_url,
            format!("http://simulator:{}", port_of(sim_listen)),
            "{name}: talks to the simulator"
        );
        assert_eq!(
            env[API_KEY_ENV], sim_key,
            "{name}: a key the simulator takes"
        );
        assert!(
            env["VIDU_WORKER__AMQP__URL"].starts_with(&format!(
                "amqp://{broker_user}:{broker_pass}@rabbitmq:5672/"
            )),
            "{name}: the compose broker and user"
        );
        let listen = settings.listen_addr().expect("listen").port();
        let ports = strings(&worker["ports"]);
        assert_eq!(ports.len(), 1, "{name}: one published port");
        let (host, container) = ports[0].rsplit_once(':').expect("HOST:CONTAINER");
        assert_eq!(
            container,
            listen.to_string(),
            "{name}: publishes http.listen"
        );
        assert!(
            host_ports.insert(host.to_owned()),
            "{name}: host port {host} taken"
        );
        let stop = compose_duration_secs(worker["stop_grace_period"].as_str().expect("stop"));
        assert!(
            Duration::from_secs(stop) > settings.shutdown.grace_period,
            "{name}: stop_grace_period must exceed shutdown.grace_period"
        );
        for (dependency, condition) in worker["depends_on"].as_object().expect("depends_on") {
            assert_eq!(condition["condition"], "service_healthy", "{name}");
            assert!(
                services[dependency].get("healthcheck").is_some(),
                "{name}: {dependency} has a healthcheck"
            );
        }
        let context = worker["build"]["context"].as_str().expect("build context");
        let dockerfile = repo_path("deploy")
            .join(context)
            .join(worker["build"]["dockerfile"].as_str().expect("dockerfile"));
        assert!(
            dockerfile.is_file(),
            "{name}: builds the repository's Dockerfile"
        );
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------

/// One Dockerfile instruction with continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's instructions, with the global `ARG` defaults (those
/// before the first `FROM`) substituted into `FROM` lines.
fn dockerfile() -> Vec<Instruction> {
    let mut out = parse_dockerfile();
    let mut global_args: Vec<(String, String)> = Vec::new();
    let mut in_stage = false;
    for i in &mut out {
        match i.keyword.as_str() {
            "ARG" if !in_stage => {
                if let Some((name, default)) = i.args.split_once('=') {
                    global_args.push((name.to_owned(), default.trim_matches('"').to_owned()));
                }
            }
            "FROM" => {
                in_stage = true;
                for (name, value) in &global_args {
                    i.args = i
                        .args
                        .replace(&format!("${{{name}}}"), value)
                        .replace(&format!("${name}"), value);
                }
            }
            _ => {}
        }
    }
    out
}

fn parse_dockerfile() -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_uppercase(),
            args: args.trim().to_owned(),
        });
        current.clear();
    }
    out
}

/// The instructions of the last stage (the image that ships).
fn final_stage(instructions: &[Instruction]) -> &[Instruction] {
    let start = instructions
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("a FROM");
    &instructions[start..]
}

#[test]
fn the_image_keeps_its_contract() {
    let all = dockerfile();
    let stages = all.iter().filter(|i| i.keyword == "FROM").count();
    assert!(stages >= 3, "multi-stage: plan, cook and build, runtime");
    let cook = all
        .iter()
        .position(|i| i.keyword == "RUN" && i.args.contains("cargo chef cook"))
        .expect("dependencies cooked in their own layer");
    let copy_all = all
        .iter()
        .rposition(|i| i.keyword == "COPY" && i.args == ". .")
        .expect("the sources copied for the build");
    assert!(
        cook < copy_all,
        "dependencies are cooked before the sources arrive"
    );
    assert!(all
        .iter()
        .any(|i| i.keyword == "RUN" && i.args.contains("--locked")));

    let runtime = final_stage(&all);
    let from = &runtime[0].args;
    assert!(
        from.contains("bookworm-slim") || from.contains("distroless"),
        "a small runtime image: {from}"
    );
    let one = |keyword: &str| -> &str {
        let found: Vec<&Instruction> = runtime.iter().filter(|i| i.keyword == keyword).collect();
        assert_eq!(found.len(), 1, "one {keyword} in the runtime stage");
        &found[0].args
    };
    assert_eq!(one("ENTRYPOINT"), r#"["vidu-worker"]"#);
    assert_eq!(one("CMD"), r#"["run"]"#);
    let default_port = port_of(&Settings::default().http.listen);
    assert_eq!(one("EXPOSE"), default_port.to_string());
    assert_eq!(one("USER"), format!("{IMAGE_UID}:{IMAGE_UID}"));

    // config/default.toml is where the worker looks: relative to WORKDIR.
    let workdir = one("WORKDIR").trim_end_matches('/').to_owned();
    let (config_dir, _) = DEFAULT_FILE.split_once('/').expect("config/default.toml");
    let copies: Vec<&str> = runtime
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| i.args.as_str())
        .collect();
    assert_eq!(copies.len(), 2, "only the binary and config/: {copies:?}");
    assert!(
        copies
            .iter()
            .any(|c| *c == format!("{config_dir}/ ./{config_dir}/")
                || *c == format!("{config_dir}/ {workdir}/{config_dir}/")),
        "config/ copied under WORKDIR {workdir}: {copies:?}"
    );
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("--from=builder") && c.ends_with("/usr/local/bin/vidu-worker")),
        "the binary on PATH: {copies:?}"
    );
    assert!(
        runtime
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("ca-certificates")),
        "rustls with native roots needs the CA certificates"
    );

    let healthcheck = one("HEALTHCHECK");
    for tool in ["curl", "wget"] {
        assert!(!healthcheck.contains(tool), "the image has no {tool}");
    }
    assert!(healthcheck.contains(&format!("/{default_port}")));
}

/// The `CMD ["…"]` of the Dockerfile's HEALTHCHECK as an argument vector.
fn healthcheck_argv() -> Vec<String> {
    let all = dockerfile();
    let args = &final_stage(&all)
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK")
        .args;
    let json_start = args.find("CMD [").expect("HEALTHCHECK … CMD [exec form]") + "CMD ".len();
    serde_json::from_str(&args[json_start..]).expect("exec form is a JSON array")
}

fn run_healthcheck(argv: &[String]) -> bool {
    std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The HEALTHCHECK only uses what the runtime image has (bash, head, grep),
/// and really tells a live operations endpoint from a wrong one; so does the
/// compose file's simulator check.
#[tokio::test]
async fn the_healthchecks_work_against_a_real_worker() {
    let env =
        vidu_test_kit::TestEnv::new("deploy", vidu_test_kit::sim(Duration::from_secs(1))).await;
    let worker = env.start_worker().await;
    let ops = worker.ops_addr().await;
    let port = ops.rsplit(':').next().expect("port").to_owned();
    let default_port = port_of(&Settings::default().http.listen).to_string();

    let argv = healthcheck_argv();
    let with = |from: &str, to: &str| -> Vec<String> {
        argv.iter().map(|a| a.replace(from, to)).collect()
    };
    let live = with(&format!("/{default_port}"), &format!("/{port}"));
    assert_ne!(live, argv, "the port is in the command");
    let ok = tokio::task::spawn_blocking(move || run_healthcheck(&live))
        .await
        .expect("join");
    assert!(ok, "the HEALTHCHECK passes against a live worker");
    let wrong_path: Vec<String> = with(&format!("/{default_port}"), &format!("/{port}"))
        .iter()
        .map(|a| a.replace("/healthz", "/nope"))
        .collect();
    let ok = tokio::task::spawn_blocking(move || run_healthcheck(&wrong_path))
        .await
        .expect("join");
    assert!(!ok, "a 404 is not healthy");

    // The compose simulator's check, against a live simulator.
    let sim_port = env
        .sim
        .base_url()
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let compose = compose();
    let test = strings(&compose["services"]["simulator"]["healthcheck"]["test"]);
    assert_eq!(test.first().map(String::as_str), Some("CMD"));
    let sim_check: Vec<String> = test[1..]
        .iter()
        .map(|a| a.replace("/8089", &format!("/{sim_port}")))
        .collect();
    assert_ne!(sim_check, test[1..]);
    let ok = tokio::task::spawn_blocking(move || run_healthcheck(&sim_check))
        .await
        .expect("join");
    assert!(
        ok,
        "the simulator healthcheck passes against a live simulator"
    );
}

/// A `.dockerignore` pattern as used here: a top-level name, or `**/` plus a
/// name or `*.ext`. Other forms are refused so the matcher stays honest.
fn ignored(patterns: &[String], path: &str) -> bool {
    // Docker's rule: the last pattern that matches decides; `!` re-includes.
    let matches = |p: &str| {
        if let Some(rest) = p.strip_prefix("**/") {
            let name = path.rsplit('/').next().unwrap_or(path);
            match rest.strip_prefix('*') {
                Some(suffix) => name.ends_with(suffix),
                None => path.split('/').any(|c| c == rest),
            }
        } else {
            assert!(!p.contains('*'), "pattern {p:?}: teach this test about it");
            path == p || path.starts_with(&format!("{p}/"))
        }
    };
    patterns
        .iter()
        .fold(false, |ignored, p| match p.strip_prefix('!') {
            Some(kept) if matches(kept) => false,
            Some(_) => ignored,
            None if matches(p) => true,
            None => ignored,
        })
}

#[test]
fn the_build_context_has_what_the_build_needs_and_nothing_else() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_owned())
        .collect();
    for kept in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/lib.rs",
        "config/default.toml",
    ] {
        assert!(!ignored(&patterns, kept), "{kept} is needed by the build");
    }
    for dropped in [
        "target/debug/vidu-worker",
        ".git/HEAD",
        "tests/suite/end_to_end.rs",
        "deploy/kubernetes/deployment.yaml",
        "docs/asyncapi.yaml",
        "some/dir/.env",
    ] {
        assert!(
            ignored(&patterns, dropped),
            "{dropped} stays out of the context"
        );
    }
    // A target Cargo.toml declares explicitly must exist in the context, or
    // cargo refuses the manifest even when building only the binary.
    let manifest = read("Cargo.toml");
    for line in manifest.lines() {
        let line = line.trim();
        if let Some(path) = line.strip_prefix("path").map(str::trim) {
            if let Some(path) = path.strip_prefix('=') {
                let path = path.trim().trim_matches('"');
                assert!(
                    !ignored(&patterns, path),
                    "Cargo.toml names {path}, which .dockerignore drops"
                );
            }
        }
    }
    // Every member of the workspace must load, or cargo refuses to build.
    let members = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("members"))
        .unwrap_or_default();
    for member in members.split('"').skip(1).step_by(2) {
        if member == "." {
            continue;
        }
        for file in ["Cargo.toml", "src/lib.rs"] {
            let path = format!("{member}/{file}");
            assert!(
                !ignored(&patterns, &path),
                "{path} belongs to a workspace member, and .dockerignore drops it"
            );
        }
    }
    for section in ["[[test]]", "[[example]]"] {
        // A target without a `path` is looked up in its default folder; one
        // with a path was checked above.
        let pathless = manifest.split(section).skip(1).any(|block| {
            let block = block.split("\n[").next().unwrap_or(block);
            !block.lines().any(|l| l.trim().starts_with("path"))
        });
        if pathless {
            let dir = if section == "[[test]]" {
                "tests"
            } else {
                "examples"
            };
            assert!(
                !ignored(&patterns, &format!("{dir}/x.rs")),
                "Cargo.toml declares {section} targets but .dockerignore drops {dir}/"
            );
        }
    }
    for src in std::fs::read_dir(repo_path("src")).expect("src").flatten() {
        let text = std::fs::read_to_string(src.path()).unwrap_or_default();
        for token in ["include_str!(", "include_bytes!("] {
            for (i, _) in text.match_indices(token) {
                let rest = &text[i + token.len()..];
                let path = rest.split('"').nth(1).unwrap_or_default();
                let path = path.trim_start_matches("../");
                assert!(
                    !ignored(&patterns, path),
                    "src includes {path}, dropped by .dockerignore"
                );
            }
        }
    }
}

#[test]
fn the_deploy_readmes_cover_every_file() {
    let readme = read("deploy/README.md");
    let mut files = vec!["docker-compose.yml".to_owned()];
    for entry in std::fs::read_dir(repo_path(KUBERNETES_DIR))
        .expect("dir")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            for inner in std::fs::read_dir(entry.path()).expect("dir").flatten() {
                files.push(format!("{name}/{}", inner.file_name().to_string_lossy()));
            }
        }
        files.push(name);
    }
    for file in &files {
        assert!(
            readme.contains(file.as_str()),
            "deploy/README.md does not mention {file}"
        );
    }
    let schemas_readme = read("deploy/schemas/README.md");
    let mut vendored = Vec::new();
    let mut stack = vec![repo_path("deploy/schemas")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                vendored.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    assert!(vendored.len() >= 10);
    for file in vendored {
        assert!(
            schemas_readme.contains(&file),
            "deploy/schemas/README.md does not say where {file} comes from"
        );
    }
}
