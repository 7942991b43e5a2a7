//! The manifests for running on a RabbitMQ cluster in Kubernetes
//! (`deploy/kubernetes/rabbitmq-cluster/`): a `RabbitmqCluster` of the
//! RabbitMQ Cluster Operator, the Messaging Topology Operator's `Exchange`,
//! `Queue`, `User`, `Permission` and `Binding` resources, and the worker's
//! Deployment on that cluster.
//!
//! - every manifest validates against the schema of its kind (the operators'
//!   written from their documented spec and published CRDs, in
//!   `deploy/schemas/rabbitmq-operators/`), and those schemas refuse typical
//!   mistakes;
//! - the topology resources are exactly what the worker declares (names,
//!   types, durability, arguments, no bindings) and what
//!   `deploy/rabbitmq/definitions.json` holds; the worker's permissions are
//!   the ones `infrastructure::` proves minimal; the producer ingress is the
//!   README's recommended setup;
//! - the Deployment is `deploy/kubernetes/deployment.yaml` but for its broker
//!   settings, which point at the cluster's Service with the operator's
//!   generated credentials, and the worker accepts them.

use std::collections::{BTreeSet, HashMap};

use crate::deploy_files::{
    load_settings, manifests_in, option_value, schema_file_for, strings, the, validate_manifest,
    Manifest, KUBERNETES_DIR, RABBITMQ_SCHEMA_DIR,
};
use crate::files::{load_json, read, repo_path};
use crate::infrastructure::{
    amqp_json, regexps, shipped_definitions_path, worker_permissions, Mode,
};
use serde_json::{json, Map, Value};
use vidu_worker::{
    broker::Topology,
    config::{QueueType, Settings},
};

const CLUSTER_DIR: &str = "deploy/kubernetes/rabbitmq-cluster";
/// The AMQP port of the cluster's client Service.
const AMQP_PORT: u16 = 5672;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn cluster_manifests() -> Vec<Manifest> {
    manifests_in(CLUSTER_DIR)
}

/// The manifests of one file of the directory.
fn from_file(all: &[Manifest], file: &str) -> Vec<Manifest> {
    let prefix = format!("{CLUSTER_DIR}/{file}#");
    let found: Vec<Manifest> = all
        .iter()
        .filter(|m| m.origin.starts_with(&prefix))
        .cloned()
        .collect();
    assert!(!found.is_empty(), "{CLUSTER_DIR}/{file} has manifests");
    found
}

fn of_kind<'a>(all: &'a [Manifest], kind: &str) -> Vec<&'a Manifest> {
    all.iter().filter(|m| m.kind() == kind).collect()
}

/// The RabbitMQ-side name of a topology resource (`spec.name`).
fn spec_name(m: &Manifest) -> &str {
    m.doc["spec"]["name"].as_str().unwrap_or_default()
}

/// One container env var by name.
fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no env var {name}"))
}

/// The Secret a User resource's generated credentials are stored in.
fn credentials_secret(user: &Manifest) -> String {
    format!("{}-user-credentials", user.name())
}

/// A temporary file, removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The worker's settings exactly as in a pod of the cluster Deployment: the
/// ConfigMap passed with `--config`, the container's environment with Secret
/// references filled in with placeholders and the mounted password file
/// replaced by a temporary one (read again at every connection: keep it).
fn cluster_worker_settings() -> (Settings, TempFile) {
    let all = cluster_manifests();
    let deployment = the(&all, "Deployment");
    let base = manifests_in(KUBERNETES_DIR);
    let config_map = the(&base, "ConfigMap");
    let pod = &deployment.doc["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    let args = strings(&container["args"]);
    let config_path = option_value(&args, "--config").expect("--config FILE");
    let file = config_path.rsplit('/').next().expect("file name");
    let key = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["configMap"]["items"].as_array())
        .flatten()
        .find(|i| i["path"] == file)
        .and_then(|i| i["key"].as_str())
        .expect("the projected config file");
    let config_text = config_map.doc["data"][key].as_str().expect("config text");

    let password = TempFile(std::env::temp_dir().join(format!(
        "vidu-worker-cluster-password-{}",
        uuid::Uuid::new_v4().simple()
    )));
    std::fs::write(&password.0, "placeholder-password\n").expect("write temp password");
    let mut env = HashMap::new();
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().expect("name").to_owned();
        let value = match var["value"].as_str() {
            Some(_) if name == "VIDU_WORKER__AMQP__PASSWORD_FILE" => {
                password.0.to_string_lossy().into_owned()
            }
            Some(v) => v.to_owned(),
            None => format!(
                "placeholder-{}",
                var["valueFrom"]["secretKeyRef"]["key"]
                    .as_str()
                    .expect("a Secret reference")
            ),
        };
        env.insert(name, value);
    }
    (load_settings(Some(config_text), &env), password)
}

// ---------------------------------------------------------------------------
// Schemas
// ---------------------------------------------------------------------------

#[test]
fn every_cluster_manifest_matches_its_schema() {
    let all = cluster_manifests();
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
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Binding",
            "Deployment",
            "Exchange",
            "Permission",
            "Queue",
            "RabbitmqCluster",
            "User"
        ])
    );
    // Every written schema is used, and found by the same lookup as the
    // Kubernetes and KEDA ones.
    let mut used = BTreeSet::new();
    for m in &all {
        let api_version = m.doc["apiVersion"].as_str().unwrap_or_default();
        let file = schema_file_for(api_version, m.kind()).expect("a schema");
        if file.starts_with(RABBITMQ_SCHEMA_DIR) {
            used.insert(file);
        }
    }
    let written: BTreeSet<String> = std::fs::read_dir(repo_path(RABBITMQ_SCHEMA_DIR))
        .expect("schema dir")
        .flatten()
        .map(|e| format!("{RABBITMQ_SCHEMA_DIR}/{}", e.file_name().to_string_lossy()))
        .collect();
    assert_eq!(used, written, "a schema nobody uses, or a kind without one");
    for file in &written {
        let schema = load_json(file);
        assert_eq!(
            schema["properties"]["apiVersion"]["const"],
            "rabbitmq.com/v1beta1"
        );
        assert!(
            schema["description"]
                .as_str()
                .is_some_and(|d| d.starts_with("Written for vidu-worker")),
            "{file} says it is written for this project"
        );
    }
    assert!(
        schema_file_for("rabbitmq.com/v1", "Queue").is_err(),
        "another version of the API has no schema here"
    );
}

/// The operators' schemas are not vacuous: typical mistakes are refused.
#[test]
fn schemas_refuse_broken_operator_resources() {
    let all = cluster_manifests();
    let cluster = the(&all, "RabbitmqCluster").doc;
    let queue = of_kind(&all, "Queue")
        .into_iter()
        .find(|m| m.doc["spec"]["arguments"].is_object())
        .expect("a queue with arguments")
        .doc
        .clone();
    let exchange = of_kind(&all, "Exchange")[0].doc.clone();
    let binding = the(&all, "Binding").doc;
    let user = of_kind(&all, "User")[0].doc.clone();
    let permission = of_kind(&all, "Permission")[0].doc.clone();

    type Break = fn(&mut Value);
    let cases: Vec<(&str, &Value, Break)> = vec![
        ("cluster replicas as a string", &cluster, |d| {
            d["spec"]["replicas"] = json!("3");
        }),
        ("negative cluster replicas", &cluster, |d| {
            d["spec"]["replicas"] = json!(-1);
        }),
        ("a typo in the cluster spec", &cluster, |d| {
            d["spec"]["replica"] = json!(3);
        }),
        ("an unknown Service type", &cluster, |d| {
            d["spec"]["service"]["type"] = json!("Headless");
        }),
        ("storage that is not a quantity", &cluster, |d| {
            d["spec"]["persistence"]["storage"] = json!("ten gigs");
        }),
        ("a typo in the cluster's resources", &cluster, |d| {
            d["spec"]["resources"]["request"] = json!({"cpu": "1"});
        }),
        ("rabbitmq.conf settings as a map", &cluster, |d| {
            d["spec"]["rabbitmq"]["additionalConfig"] = json!({"max_message_size": 1310720});
        }),
        ("a status in a manifest", &cluster, |d| {
            d["status"] = json!({"conditions": []});
        }),
        ("a cluster without a name", &cluster, |d| {
            d["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("name");
        }),
        ("labels as a list", &cluster, |d| {
            d["metadata"]["labels"] = json!(["vidu"]);
        }),
        ("a queue without its name", &queue, |d| {
            d["spec"].as_object_mut().expect("spec").remove("name");
        }),
        ("durable as a string", &queue, |d| {
            d["spec"]["durable"] = json!("true");
        }),
        ("autoDelete misspelt", &queue, |d| {
            let value = d["spec"]["autoDelete"].take();
            d["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("autoDelete");
            d["spec"]["autodelete"] = value;
        }),
        ("an unknown deletion policy", &queue, |d| {
            d["spec"]["deletionPolicy"] = json!("keep");
        }),
        ("arguments as a list", &queue, |d| {
            d["spec"]["arguments"] = json!([["x-queue-type", "quorum"]]);
        }),
        ("a queue without a cluster", &queue, |d| {
            d["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("rabbitmqClusterReference");
        }),
        ("a cluster by name and by connection secret", &queue, |d| {
            d["spec"]["rabbitmqClusterReference"]["connectionSecret"] = json!({"name": "other"});
        }),
        ("a wrong kind for the API", &queue, |d| {
            d["kind"] = json!("Queues");
        }),
        (
            "an internal exchange (not a field of the CRD)",
            &exchange,
            |d| {
                d["spec"]["internal"] = json!(false);
            },
        ),
        ("an exchange type that is not a string", &exchange, |d| {
            d["spec"]["type"] = json!(["topic"]);
        }),
        ("an unknown binding destination type", &binding, |d| {
            d["spec"]["destinationType"] = json!("queues");
        }),
        ("a binding routing key that is a number", &binding, |d| {
            d["spec"]["routingKey"] = json!(42);
        }),
        ("an unknown user tag", &user, |d| {
            d["spec"]["tags"] = json!(["admin"]);
        }),
        ("a connection limit as a string", &user, |d| {
            d["spec"]["limits"] = json!({"connections": "10"});
        }),
        ("a password in the user spec", &user, |d| {
            d["spec"]["password"] = json!("hunter2");
        }),
        ("a permission without a vhost", &permission, |d| {
            d["spec"].as_object_mut().expect("spec").remove("vhost");
        }),
        (
            "a permission for a user and a user reference",
            &permission,
            |d| {
                d["spec"]["user"] = json!("vidu-worker");
            },
        ),
        ("a permission for nobody", &permission, |d| {
            d["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("userReference");
        }),
        ("a permission column misspelt", &permission, |d| {
            let value = d["spec"]["permissions"]["write"].take();
            let permissions = d["spec"]["permissions"]
                .as_object_mut()
                .expect("permissions");
            permissions.remove("write");
            permissions.insert("writes".into(), value);
        }),
    ];
    for (label, original, break_it) in cases {
        let mut broken = original.clone();
        break_it(&mut broken);
        assert_ne!(&broken, original, "{label}: the mutation changed nothing");
        assert!(validate_manifest(&broken).is_err(), "{label}: not caught");
    }
}

// ---------------------------------------------------------------------------
// The topology: the worker's own, and definitions.json's
// ---------------------------------------------------------------------------

/// A Queue resource as the queue RabbitMQ gets: the operator sends `type` as
/// the `x-queue-type` argument.
fn declared_queue(m: &Manifest) -> Value {
    let spec = &m.doc["spec"];
    let mut arguments: Map<String, Value> =
        spec["arguments"].as_object().cloned().unwrap_or_default();
    assert!(
        !arguments.contains_key("x-queue-type"),
        "{}: the queue type goes in spec.type only",
        m.origin
    );
    let queue_type = spec["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: spec.type (the default would be classic)", m.origin));
    arguments.insert("x-queue-type".into(), json!(queue_type));
    json!({
        "name": spec["name"],
        "vhost": spec["vhost"],
        "durable": spec["durable"],
        "auto_delete": spec["autoDelete"],
        "arguments": arguments,
    })
}

#[test]
fn the_topology_resources_are_exactly_the_workers_topology() {
    let (settings, _password) = cluster_worker_settings();
    assert!(
        !settings.amqp.declare_topology,
        "the operator owns the topology, the worker only checks it"
    );
    assert_eq!(
        settings.amqp.queue_type,
        QueueType::Quorum,
        "quorum queues, replicated on the cluster's nodes"
    );
    let topology = Topology::new(&settings);
    let vhost = settings.amqp.vhost();
    let all = cluster_manifests();
    let resources = from_file(&all, "topology.yaml");
    let kinds: BTreeSet<&str> = resources.iter().map(Manifest::kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["Exchange", "Queue"]),
        "and no bindings"
    );

    // The worker's declarations, as RabbitMQ's definitions format.
    let expected: Vec<Value> = topology
        .queue_declarations()
        .iter()
        .map(|(name, args)| {
            let arguments: Map<String, Value> = args
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_json(v)))
                .collect();
            json!({"name": name, "vhost": vhost, "durable": true, "auto_delete": false,
                   "arguments": arguments})
        })
        .collect();
    let queues: Vec<Value> = of_kind(&resources, "Queue")
        .into_iter()
        .map(declared_queue)
        .collect();
    assert_eq!(queues, expected, "the worker's queues, in its order");

    // The same as definitions.json (for the operators who import it).
    let text = std::fs::read_to_string(shipped_definitions_path()).expect("definitions.json");
    let definitions: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(Value::Array(queues), definitions["queues"]);
    assert_eq!(definitions["bindings"], json!([]));

    let exchanges = of_kind(&resources, "Exchange");
    assert_eq!(exchanges.len(), 1, "one exchange");
    let spec = &exchanges[0].doc["spec"];
    let declared = json!({
        "name": spec["name"], "vhost": spec["vhost"], "type": spec["type"],
        "durable": spec["durable"], "auto_delete": spec["autoDelete"],
        // Exchanges the operator creates are never internal.
        "internal": false,
        "arguments": spec.get("arguments").cloned().unwrap_or_else(|| json!({})),
    });
    assert_eq!(declared, definitions["exchanges"][0]);
    assert_eq!(spec["name"], settings.amqp.events_exchange);
    assert_eq!(spec["type"], "topic");

    // Queues hold requests and tickets of tasks in flight: deleting their
    // resources must not delete them.
    for queue in of_kind(&resources, "Queue") {
        assert_eq!(
            queue.doc["spec"]["deletionPolicy"], "retain",
            "{}",
            queue.origin
        );
    }
    // Resource names are unique and say which queue they are.
    let mut names = BTreeSet::new();
    for m in &resources {
        assert!(names.insert(m.name()), "{} named twice", m.name());
        assert_eq!(m.name(), spec_name(m).replace('.', "-"), "{}", m.origin);
    }
}

#[test]
fn the_worker_user_has_exactly_the_documented_managed_permissions() {
    let (settings, _password) = cluster_worker_settings();
    let all = cluster_manifests();
    let resources = from_file(&all, "worker-user.yaml");
    let user = the(&resources, "User");
    let permission = the(&resources, "Permission");
    let spec = &user.doc["spec"];
    assert!(spec.get("tags").is_none(), "no management UI access");
    assert!(
        spec.get("importCredentialsSecret").is_none(),
        "the operator generates the credentials"
    );

    let granted = &permission.doc["spec"];
    assert_eq!(granted["userReference"]["name"], user.name());
    assert_eq!(granted["vhost"], settings.amqp.vhost());
    let [configure, write, read] = regexps(&worker_permissions(
        Mode::Managed,
        &settings.amqp.request_queue,
        &settings.amqp.events_exchange,
    ));
    assert_eq!(
        granted["permissions"],
        json!({"configure": configure, "write": write, "read": read}),
        "the permissions the infrastructure tests prove minimal"
    );
}

#[test]
fn the_producer_ingress_is_the_readmes_recommended_setup() {
    let (settings, _password) = cluster_worker_settings();
    let all = cluster_manifests();
    let resources = from_file(&all, "producer-ingress.yaml");
    let exchange = the(&resources, "Exchange");
    let binding = the(&resources, "Binding");
    let user = the(&resources, "User");
    let permission = the(&resources, "Permission");
    let ingress = spec_name(&exchange);
    assert_eq!(exchange.doc["spec"]["type"], "direct");
    assert_eq!(exchange.doc["spec"]["durable"], true);
    assert_eq!(
        binding.doc["spec"],
        json!({
            "vhost": settings.amqp.vhost(),
            "source": ingress,
            "destination": settings.amqp.request_queue,
            "destinationType": "queue",
            "routingKey": settings.amqp.request_queue,
            "rabbitmqClusterReference": exchange.doc["spec"]["rabbitmqClusterReference"],
        })
    );
    let escaped = ingress.replace('.', "\\.");
    assert_eq!(permission.doc["spec"]["userReference"]["name"], user.name());
    assert_eq!(
        permission.doc["spec"]["permissions"],
        json!({"configure": "^$", "write": format!("^{escaped}$"), "read": "^$"})
    );
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("`write ^{escaped}$`")),
        "the README recommends exactly this producer permission"
    );
    assert!(readme.contains(&format!("say `{ingress}`")));
    assert!(readme.contains(&format!(
        "with the routing key `{}`",
        settings.amqp.request_queue
    )));
    // The only bindings of the directory: the worker's topology has none.
    assert_eq!(of_kind(&all, "Binding").len(), 1);
}

// ---------------------------------------------------------------------------
// The cluster, and the workers on it
// ---------------------------------------------------------------------------

#[test]
fn the_cluster_has_three_nodes_and_the_brokers_settings() {
    let (settings, _password) = cluster_worker_settings();
    let all = cluster_manifests();
    let cluster = the(&all, "RabbitmqCluster");
    let replicas = cluster.doc["spec"]["replicas"].as_i64().expect("replicas");
    assert_eq!(
        replicas, 3,
        "quorum queues keep a majority through the loss of one node"
    );
    if let Some(size) = settings
        .amqp
        .queue_arguments
        .get("x-quorum-initial-group-size")
    {
        let size = serde_json::to_value(size).expect("argument");
        assert!(
            size.as_i64().is_some_and(|n| n <= replicas),
            "x-quorum-initial-group-size {size} > {replicas} nodes"
        );
    }

    // The broker settings the worker relies on (deploy/rabbitmq/rabbitmq.conf).
    let config = cluster.doc["spec"]["rabbitmq"]["additionalConfig"]
        .as_str()
        .expect("additionalConfig");
    let configured: BTreeSet<&str> = config.lines().map(str::trim).collect();
    let shipped = read("deploy/rabbitmq/rabbitmq.conf");
    for line in shipped
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        assert!(configured.contains(line), "additionalConfig lacks {line}");
    }
    // Held dead letters move soon after a lost node is back, as in the
    // cluster test.
    let advanced = cluster.doc["spec"]["rabbitmq"]["advancedConfig"]
        .as_str()
        .expect("advancedConfig");
    let wanted = format!(
        "{{dead_letter_worker_publisher_confirm_timeout, {}}}",
        vidu_worker::local_broker::DEAD_LETTER_CONFIRM_TIMEOUT_MS
    );
    assert!(advanced.contains(&wanted), "advancedConfig lacks {wanted}");

    // Every resource lives in this cluster, found by name in its own
    // namespace (the Messaging Topology Operator talks to it with the
    // cluster's default user).
    for m in all
        .iter()
        .filter(|m| m.kind() != "Deployment" && m.kind() != "RabbitmqCluster")
    {
        assert_eq!(
            m.doc["spec"]["rabbitmqClusterReference"],
            json!({"name": cluster.name()}),
            "{}",
            m.origin
        );
    }
    for m in &all {
        assert!(
            m.doc["metadata"].get("namespace").is_none(),
            "{}: one namespace, chosen at apply time",
            m.origin
        );
    }
}

#[test]
fn the_cluster_deployment_is_the_base_one_pointed_at_the_cluster() {
    let all = cluster_manifests();
    let cluster = the(&all, "RabbitmqCluster");
    let user = the(&from_file(&all, "worker-user.yaml"), "User");
    let deployment = the(&all, "Deployment").doc;
    let base = the(&manifests_in(KUBERNETES_DIR), "Deployment").doc;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let base_container = &base["spec"]["template"]["spec"]["containers"][0];

    // The broker: the cluster's client Service, no credentials in the URL.
    let url = env_var(container, "VIDU_WORKER__AMQP__URL")["value"]
        .as_str()
        .expect("a plain URL, no Secret");
    let parsed = url::Url::parse(url).expect("URL");
    assert_eq!(parsed.scheme(), "amqp");
    let host = parsed.host_str().expect("host");
    assert!(
        host == cluster.name() || host.starts_with(&format!("{}.", cluster.name())),
        "{host}: the Service named after the RabbitmqCluster"
    );
    assert_eq!(parsed.port(), Some(AMQP_PORT));
    assert!(parsed.username().is_empty() && parsed.password().is_none());
    assert!(
        !url.contains(','),
        "one URL: the Service spreads over the nodes"
    );

    // The credentials the operator generated for the worker's User.
    let secret = credentials_secret(&user);
    assert_eq!(
        env_var(container, "VIDU_WORKER__AMQP__USERNAME")["valueFrom"],
        json!({"secretKeyRef": {"name": secret, "key": "username"}})
    );
    let password_file = env_var(container, "VIDU_WORKER__AMQP__PASSWORD_FILE")["value"]
        .as_str()
        .expect("a path");
    let (dir, file) = password_file.rsplit_once('/').expect("a path");
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    assert_eq!(mount["readOnly"], true);
    assert!(
        mounts
            .iter()
            .filter(|m| m["mountPath"] != dir)
            .all(|m| !dir.starts_with(m["mountPath"].as_str().unwrap_or_default())),
        "{dir} is not inside another (read-only) volume"
    );
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let volume = volumes
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["secret"]["secretName"], secret);
    assert!(
        volume["secret"].get("defaultMode").is_none(),
        "the default mode: the non-root user must read the file"
    );
    assert_eq!(
        volume["secret"]["items"],
        json!([{"key": "password", "path": file}])
    );
    assert_eq!(
        env_var(container, "VIDU_WORKER__AMQP__DECLARE_TOPOLOGY")["value"],
        "false"
    );

    // Everything else is the base Deployment: same name (the PDB, Service and
    // ScaledObject apply unchanged), probes, resources, security, other env.
    let broker_env = [
        "VIDU_WORKER__AMQP__URL",
        "VIDU_WORKER__AMQP__USERNAME",
        "VIDU_WORKER__AMQP__PASSWORD_FILE",
        "VIDU_WORKER__AMQP__DECLARE_TOPOLOGY",
    ];
    let strip = |doc: &Value, extra_volume: Option<&Value>| -> Value {
        let mut doc = doc.clone();
        let pod = &mut doc["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_array_mut().expect("volumes");
        volumes.retain(|v| Some(&v["name"]) != extra_volume);
        let container = &mut pod["containers"][0];
        let env = container["env"].as_array_mut().expect("env");
        env.retain(|v| !broker_env.iter().any(|name| v["name"] == *name));
        let mounts = container["volumeMounts"].as_array_mut().expect("mounts");
        mounts.retain(|m| Some(&m["name"]) != extra_volume);
        doc
    };
    assert_eq!(
        strip(&deployment, Some(&mount["name"])),
        strip(&base, None),
        "the cluster Deployment differs from deployment.yaml only in its broker settings"
    );
    assert_eq!(
        env_var(container, "NOVITA_API_KEY"),
        env_var(base_container, "NOVITA_API_KEY")
    );

    // And the worker accepts the whole configuration.
    let (settings, _password) = cluster_worker_settings();
    let uri = settings.amqp.connection_uri().expect("a connection URI");
    assert_eq!(uri.authority.host, host);
    assert_eq!(uri.authority.port, AMQP_PORT);
    assert_eq!(uri.authority.userinfo.username, "placeholder-username");
    assert_eq!(uri.authority.userinfo.password, "placeholder-password");
}
