//! Fitting into a broker an operations group already runs: TLS (with a
//! private CA and client certificates), vhosts, credentials from files,
//! operator-managed topology (passive checks, the shipped definitions file),
//! least-privilege permissions in both modes, queue arguments and their
//! mismatches, connection identity, and the upstream's extra CA and proxies.
//!
//! Tests that need a broker configured differently (TLS listener, users,
//! vhosts, permissions) start a private node of their own on free ports
//! (`vidu_test_kit::private_node`); the others use the shared broker with unique names.
//! Certificates are generated per test with rcgen. Every wait is on a
//! condition with a deadline.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::files;
use lapin::{
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
    types::AMQPValue,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use vidu_test_kit::*;
use vidu_worker::{
    broker::{self, Topology},
    config::{QueueType, Settings, API_KEY_ENV},
    events::{FAILED, SUCCEEDED},
    model::Model,
    upstream::RESULT_PATH,
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A test certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate issued by a [`Ca`], in PEM and DER.
struct Issued {
    cert_pem: String,
    key_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf certificate for `names` (the first is also the common name).
    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }
}

/// A directory of files for one test, removed on drop.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "vidu-integration-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self { dir }
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).expect("write a test file");
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs the binary with `args` and the environment; (exit code, stdout,
/// stderr). Environment variables the test process may carry that would
/// change the outcome (proxies, log levels) are cleared first.
async fn cli(args: &[&str], env: &[(String, String)]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vidu-worker"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove(API_KEY_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"] {
        cmd.env_remove(var).env_remove(var.to_lowercase());
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the command ends within a minute")
        .expect("the command runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Replaces or adds `key` in an environment list.
fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

/// Runs a blocking `rabbitmqctl` call from an async test.
fn ctl(node: &LocalNode, args: &[&str]) -> String {
    tokio::task::block_in_place(|| node.ctl_output(args)).unwrap_or_else(|e| panic!("{e}"))
}

/// The `rabbitmqctl list_connections` line of a worker process (found by
/// the pid in its connection name): the `columns` asked for, then its
/// client properties.
fn worker_connection(node: &LocalNode, pid: u32, columns: &[&str]) -> String {
    let mut args = vec!["list_connections"];
    args.extend_from_slice(columns);
    args.extend_from_slice(&["client_properties", "-q", "--no-table-headers"]);
    let connections = ctl(node, &args);
    let mine = format!("#{pid} ");
    connections
        .lines()
        .find(|l| l.contains(&mine))
        .unwrap_or_else(|| panic!("the connection of worker {pid} in:\n{connections}"))
        .to_owned()
}

/// Starts a private node off the async threads.
async fn private_node(options: NodeOptions) -> Arc<LocalNode> {
    Arc::new(
        tokio::task::spawn_blocking(move || private_node_with(options))
            .await
            .expect("private broker starts"),
    )
}

/// Deletes a deployment's queues and exchange, so a worker must create them.
async fn delete_topology(env: &TestEnv) {
    delete_exchange_and(env, &env.topology.queue_names()).await;
}

/// Deletes the deployment's exchange and these of its queues.
async fn delete_exchange_and(env: &TestEnv, queues: &[String]) {
    for q in queues {
        env.channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }
    env.channel
        .exchange_delete(
            env.topology.events_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete exchange");
}

// ---------------------------------------------------------------------------
// Permissions: the documented minimum, as lists of alternatives per column
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Mode {
    /// `amqp.declare_topology = true`: the worker declares.
    Declare,
    /// `amqp.declare_topology = false`: operators own the topology.
    Managed,
}

fn escape(name: &str) -> String {
    name.replace('.', "\\.")
}

/// The minimal permissions of `vidu-worker run` for one deployment:
/// [configure, write, read], each a list of anchored alternatives.
pub(crate) fn worker_permissions(
    mode: Mode,
    request_queue: &str,
    exchange: &str,
) -> [Vec<String>; 3] {
    let rq = escape(request_queue);
    let ex = escape(exchange);
    match mode {
        Mode::Declare => [
            // Declaring the queues and the exchange.
            vec![format!("{rq}(\\..+)?"), ex.clone()],
            // Publishing through the default exchange (tickets, dead letters,
            // reply_to) and to the events exchange; declaring a queue that
            // dead-letters through the default exchange needs it too.
            vec!["amq\\.default".into(), ex],
            // Consuming; declaring a queue with a dead-letter exchange needs
            // read on the queue (the wait queues); reading the journal.
            vec![
                rq.clone(),
                format!("{rq}\\.tracking"),
                format!("{rq}\\.wait\\..+"),
                format!("{rq}\\.journal"),
                format!("{rq}\\.cancel"),
            ],
        ],
        Mode::Managed => [
            // Claims on request ids and learned quota ledgers: internal
            // queues named from the request id or the value learned.
            vec![format!("{rq}\\.(claim|quota)\\..+")],
            vec!["amq\\.default".into(), ex],
            vec![
                rq.clone(),
                format!("{rq}\\.tracking"),
                format!("{rq}\\.journal"),
                format!("{rq}\\.cancel"),
            ],
        ],
    }
}

/// The minimal permissions of `vidu-worker submit --wait` with
/// `amqp.declare_topology = false`: a server-named exclusive queue bound to
/// the events exchange.
fn submit_wait_permissions(exchange: &str) -> [Vec<String>; 3] {
    [
        vec!["amq\\.gen-.+".into()],
        vec!["amq\\.default".into(), "amq\\.gen-.+".into()],
        vec![escape(exchange), "amq\\.gen-.+".into()],
    ]
}

/// One RabbitMQ permission regexp from a list of alternatives.
fn regexp(alternatives: &[String]) -> String {
    match alternatives {
        [] => "^$".into(),
        [one] => format!("^{one}$"),
        many => format!("^({})$", many.join("|")),
    }
}

pub(crate) fn regexps(perms: &[Vec<String>; 3]) -> [String; 3] {
    [regexp(&perms[0]), regexp(&perms[1]), regexp(&perms[2])]
}

/// Definitions JSON for users, each with permissions on one vhost.
fn users_json(vhost: &str, users: &[(&str, &str, [String; 3])]) -> Value {
    json!({
        "users": users.iter().map(|(name, password, _)| json!({
            "name": name, "password": password, "tags": ""
        })).collect::<Vec<_>>(),
        "permissions": users.iter().map(|(name, _, p)| json!({
            "user": name, "vhost": vhost,
            "configure": p[0], "write": p[1], "read": p[2]
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------
// TLS to the broker
// ---------------------------------------------------------------------------

struct BrokerPki {
    ca: Ca,
    server: Issued,
    client: Issued,
}

impl BrokerPki {
    fn new() -> Self {
        let ca = Ca::new("vidu test broker CA");
        // The broker's certificate names only "localhost": connecting by
        // 127.0.0.1 must fail host name verification.
        let server = ca.issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        let client = ca.issue(&["vidu-worker"], ExtendedKeyUsagePurpose::ClientAuth);
        Self { ca, server, client }
    }

    fn node_tls(&self) -> NodeTls {
        NodeTls {
            ca_pem: self.ca.pem(),
            cert_pem: self.server.cert_pem.clone(),
            key_pem: self.server.key_pem.clone(),
            require_client_cert: true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_a_private_ca_and_a_client_certificate_runs_the_happy_path() {
    let pki = BrokerPki::new();
    let node = private_node(NodeOptions {
        tls: Some(pki.node_tls()),
        ..NodeOptions::default()
    })
    .await;
    let files = Files::new();
    let tls_env = owned(&[
        (
            "VIDU_WORKER__AMQP__URL",
            &node.tls_url("localhost").expect("a TLS listener"),
        ),
        (
            "VIDU_WORKER__AMQP__TLS__CA_FILE",
            &files.write("ca.pem", &pki.ca.pem()),
        ),
        (
            "VIDU_WORKER__AMQP__TLS__CERT_FILE",
            &files.write("client.pem", &pki.client.cert_pem),
        ),
        (
            "VIDU_WORKER__AMQP__TLS__KEY_FILE",
            &files.write("client.key", &pki.client.key_pem),
        ),
    ]);
    // The test itself talks to the node over its plain listener.
    let url = node.url();
    let env = TestEnv::with("tls", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into()
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker_with(&as_refs(&tls_env)).await;

    env.publish(&request("tls-1", "over TLS")).await;
    let terminal = tap.wait_terminal("tls-1", Duration::from_secs(30)).await;
    assert_eq!(terminal.kind(), SUCCEEDED, "{:?}", terminal.body);

    // The broker sees the worker's connection as TLS with the client
    // certificate.
    let line = worker_connection(&node, worker.pid(), &["ssl", "peer_cert_subject"]);
    assert!(
        line.starts_with("true\tCN=vidu-worker\t"),
        "a TLS connection with the client certificate: {line}"
    );

    let mut check_env = env.worker_env();
    for (k, v) in &tls_env {
        set(&mut check_env, k, v);
    }
    let (code, stdout, stderr) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("reachable over TLS with a client certificate"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_fails_closed_with_an_error_naming_the_problem() {
    let pki = BrokerPki::new();
    let other = Ca::new("some other CA");
    let node = private_node(NodeOptions {
        tls: Some(pki.node_tls()),
        ..NodeOptions::default()
    })
    .await;
    let files = Files::new();
    let ca = files.write("ca.pem", &pki.ca.pem());
    let wrong_ca = files.write("other-ca.pem", &other.pem());
    let cert = files.write("client.pem", &pki.client.cert_pem);
    let key = files.write("client.key", &pki.client.key_pem);
    let url = node.url();
    let env = TestEnv::with("tlsfail", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into()
    })
    .await;
    let with = |pairs: &[(&str, &str)]| {
        let mut e = env.worker_env();
        for (k, v) in pairs {
            set(&mut e, k, v);
        }
        e
    };
    let tls_url = node.tls_url("localhost").expect("a TLS listener");

    // A broker certificate signed by a CA the worker does not trust: the
    // worker never connects, says why, and is not ready.
    let wrong = [
        ("VIDU_WORKER__AMQP__URL", tls_url.as_str()),
        ("VIDU_WORKER__AMQP__TLS__CA_FILE", wrong_ca.as_str()),
        ("VIDU_WORKER__AMQP__TLS__CERT_FILE", cert.as_str()),
        ("VIDU_WORKER__AMQP__TLS__KEY_FILE", key.as_str()),
    ];
    let worker = env.spawn_worker(&wrong);
    let line = eventually(
        Duration::from_secs(30),
        "the worker to say why it cannot connect",
        || async {
            worker
                .logs()
                .into_iter()
                .find(|l| l.contains("not signed by a trusted CA"))
        },
    )
    .await;
    assert!(line.contains(&wrong_ca), "names the CA file: {line}");
    assert!(!line.contains("guest:guest"), "no password: {line}");
    let (status, body) = eventually(Duration::from_secs(10), "/readyz", || async {
        worker.get("/readyz").await
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not signed by a trusted CA"), "{body}");
    let connections = ctl(
        &node,
        &[
            "list_connections",
            "client_properties",
            "-q",
            "--no-table-headers",
        ],
    );
    assert!(
        !connections.contains(&format!("#{} ", worker.pid())),
        "no AMQP connection from the refusing worker: {connections}"
    );
    drop(worker);

    // `check` names each problem: exit 1 for a broker it cannot trust or
    // reach, 2 for a configuration error, 0 when all is well.
    let url = ("VIDU_WORKER__AMQP__URL", tls_url.as_str());
    let other_host = node.tls_url("127.0.0.1").expect("a TLS listener");
    let ca_file = ("VIDU_WORKER__AMQP__TLS__CA_FILE", ca.as_str());
    let cert_file = ("VIDU_WORKER__AMQP__TLS__CERT_FILE", cert.as_str());
    let key_file = ("VIDU_WORKER__AMQP__TLS__KEY_FILE", key.as_str());
    let cases = [
        (
            "the worker's settings above",
            wrong.to_vec(),
            1,
            "not signed by a trusted CA",
        ),
        (
            "no CA file: only the system roots are trusted, no fallback to an unverified connection",
            vec![url, cert_file, key_file],
            1,
            "not signed by a trusted CA",
        ),
        (
            "the right CA but a host name the certificate does not list",
            vec![
                ("VIDU_WORKER__AMQP__URL", other_host.as_str()),
                ca_file,
                cert_file,
                key_file,
            ],
            1,
            "does not name the host",
        ),
        (
            "the broker requires a client certificate and none is configured",
            vec![url, ca_file],
            1,
            "amqp.tls.cert_file",
        ),
        (
            "TLS files with a plain amqp:// URL: a configuration error, not a silent downgrade",
            vec![ca_file],
            2,
            "amqp.tls.ca_file",
        ),
        (
            "the complete, right configuration against the same node",
            vec![url, ca_file, cert_file, key_file],
            0,
            "",
        ),
    ];
    for (case, pairs, expected, says) in cases {
        let (code, stdout, stderr) = cli(&["check"], &with(&pairs)).await;
        assert_eq!(code, Some(expected), "{case}: {stdout}{stderr}");
        match expected {
            1 => assert!(
                stdout.contains("FAIL broker") && stdout.contains(says),
                "{case}: {stdout}"
            ),
            2 => assert!(stderr.contains(says), "{case}: {stderr}"),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Vhosts, credentials and least privilege
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_least_privilege_user_on_its_own_vhost_declares_and_runs_with_its_password_from_a_file() {
    let node = private_node(NodeOptions::default()).await;
    let vhost = "team/vidu";
    let encoded = "team%2Fvidu";
    node.import_definitions_json(&json!({
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": "guest", "vhost": vhost,
                         "configure": ".*", "write": ".*", "read": ".*"}],
    }))
    .expect("import definitions");
    let url = node.url_for("guest", "guest", encoded);
    let env = TestEnv::with("leastdecl", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into()
    })
    .await;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let perms = regexps(&worker_permissions(
        Mode::Declare,
        &env.topology.request_queue,
        &env.topology.events_exchange,
    ));
    node.import_definitions_json(&users_json(
        vhost,
        &[("vidu-worker", password.as_str(), perms)],
    ))
    .expect("import definitions");
    // The worker must create everything itself.
    delete_topology(&env).await;

    let files = Files::new();
    let password_file = files.write("password", &format!("{password}\n"));
    let worker_env = owned(&[
        // No credentials in the URL: they come from the settings.
        (
            "VIDU_WORKER__AMQP__URL",
            &format!("amqp://127.0.0.1:{}/{encoded}", node.port()),
        ),
        ("VIDU_WORKER__AMQP__USERNAME", "vidu-worker"),
        ("VIDU_WORKER__AMQP__PASSWORD_FILE", &password_file),
    ]);
    let worker = env.start_worker_with(&as_refs(&worker_env)).await;
    let tap = env.tap().await;
    env.publish(&request("ok-1", "least privilege")).await;
    env.publish(&json!({"request_id": "bad-1", "input": {"images": []}}))
        .await;
    let ok = tap.wait_terminal("ok-1", Duration::from_secs(30)).await;
    assert_eq!(ok.kind(), SUCCEEDED, "{:?}", ok.body);
    let bad = tap.wait_terminal("bad-1", Duration::from_secs(30)).await;
    assert_eq!(bad.kind(), FAILED, "{:?}", bad.body);
    let dead = eventually(Duration::from_secs(10), "the dead letter", || async {
        let d = env.drain_dead().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 1);

    // The worker runs as that user on that vhost.
    let line = worker_connection(&node, worker.pid(), &["user", "vhost"]);
    assert!(line.starts_with("vidu-worker\tteam/vidu\t"), "{line}");

    let logs = worker.logs().join("\n");
    assert!(!logs.contains(&password), "the password is never logged");
    let mut check_env = env.worker_env();
    for (k, v) in &worker_env {
        set(&mut check_env, k, v);
    }
    let (code, stdout, stderr) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("vidu-worker:***@127.0.0.1"), "{stdout}");
    assert!(!stdout.contains(&password) && !stderr.contains(&password));

    // A wrong password in the file: a clear refusal, still without it.
    let wrong = files.write("wrong", "not-the-password\n");
    set(&mut check_env, "VIDU_WORKER__AMQP__PASSWORD_FILE", &wrong);
    let (code, stdout, stderr) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("refused the user name or password"),
        "{stdout}"
    );
    assert!(!stdout.contains("not-the-password") && !stderr.contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn managed_topology_from_the_shipped_definitions_runs_with_least_privilege() {
    let node = private_node(NodeOptions::default()).await;
    // Loaded the way an operator would: rabbitmqctl import_definitions.
    let definitions = node.dir().join("vidu-definitions.json");
    std::fs::copy(shipped_definitions_path(), &definitions).expect("copy definitions");
    set_readable(&definitions);
    tokio::task::block_in_place(|| node.import_definitions(&definitions))
        .expect("import_definitions");

    let worker_password = format!("w-{}", uuid::Uuid::new_v4().simple());
    let producer_password = format!("p-{}", uuid::Uuid::new_v4().simple());
    node.import_definitions_json(&users_json(
        "/",
        &[
            (
                "vidu-worker",
                worker_password.as_str(),
                regexps(&worker_permissions(
                    Mode::Managed,
                    "vidu.requests",
                    "vidu.events",
                )),
            ),
            (
                "vidu-producer",
                producer_password.as_str(),
                regexps(&submit_wait_permissions("vidu.events")),
            ),
        ],
    ))
    .expect("import definitions");
    let url = node.url();
    let env = TestEnv::with("managed", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into();
        s.amqp.request_queue = "vidu.requests".into();
        s.amqp.events_exchange = "vidu.events".into();
        s.amqp.declare_topology = false;
    })
    .await;
    let files = Files::new();
    let worker_env = owned(&[
        (
            "VIDU_WORKER__AMQP__URL",
            &node.url_for("vidu-worker", "ignored", "%2f"),
        ),
        (
            "VIDU_WORKER__AMQP__PASSWORD_FILE",
            &files.write("password", &worker_password),
        ),
    ]);
    let worker = env.start_worker_with(&as_refs(&worker_env)).await;
    let tap = env.tap().await;
    env.publish(&request("m-1", "managed")).await;
    env.publish(&json!({"request_id": "m-bad", "input": {"duration": 99}}))
        .await;
    assert_eq!(
        tap.wait_terminal("m-1", Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );
    assert_eq!(
        tap.wait_terminal("m-bad", Duration::from_secs(30))
            .await
            .kind(),
        FAILED
    );
    eventually(Duration::from_secs(10), "the dead letter", || async {
        (!env.drain_dead().await.is_empty()).then_some(())
    })
    .await;
    assert!(
        !worker
            .logs()
            .iter()
            .any(|l| l.contains("could not claim a request id")),
        "the worker claims request ids with these permissions"
    );

    // A producer with only its own small permissions submits and waits.
    let mut producer_env = env.worker_env();
    set(
        &mut producer_env,
        "VIDU_WORKER__AMQP__URL",
        &node.url_for("vidu-producer", &producer_password, "%2f"),
    );
    let (code, stdout, stderr) = cli(
        &[
            "submit",
            "--image",
            "https://example.com/cat.png",
            "--prompt",
            "from a producer",
            "--wait",
            "--timeout",
            "40s",
        ],
        &producer_env,
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(SUCCEEDED), "{stdout}");

    let mut check_env = env.worker_env();
    for (k, v) in &worker_env {
        set(&mut check_env, k, v);
    }
    let (code, stdout, stderr) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("exchange vidu.events and 15 queues exist"),
        "{stdout}"
    );

    // RabbitMQ itself finds the imported queues equivalent to what the
    // worker would declare (a mismatch would be a 406).
    let conn = broker::connect(&env.settings, "test")
        .await
        .expect("connect");
    let mut declaring = env.settings.clone();
    declaring.amqp.declare_topology = true;
    Topology::new(&declaring)
        .declare(&conn)
        .await
        .expect("the definitions equal the worker's own declarations");
    let logs = worker.logs().join("\n");
    assert!(!logs.contains(&worker_password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn managed_mode_declares_nothing_and_lists_what_is_missing_at_start() {
    let env = TestEnv::new("missing", sim(Duration::from_millis(300))).await;
    let gone = [
        env.topology.tracking_queue.clone(),
        env.topology.wait_queues[3].1.clone(),
    ];
    delete_exchange_and(&env, &gone).await;

    let managed = [("VIDU_WORKER__AMQP__DECLARE_TOPOLOGY", "false")];
    let mut worker = env.spawn_worker(&managed);
    let code = worker.wait_exit(Duration::from_secs(30)).await;
    let logs = worker.logs().join("\n");
    assert_eq!(code, Some(1), "exits 1 at start: {logs}");
    let expected = format!(
        "missing exchange {}, queue {}, queue {}",
        env.topology.events_exchange, gone[0], gone[1]
    );
    assert!(logs.contains(&expected), "{expected} in: {logs}");
    assert!(logs.contains("deploy/rabbitmq"), "{logs}");

    let mut check_env = env.worker_env();
    set(
        &mut check_env,
        "VIDU_WORKER__AMQP__DECLARE_TOPOLOGY",
        "false",
    );
    let (code, stdout, _) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains(&expected), "{stdout}");

    // Nothing was created behind the operators' backs.
    let conn = broker::connect(&env.settings, "test")
        .await
        .expect("connect");
    let missing = env.topology.missing(&conn).await.expect("passive check");
    assert_eq!(missing.len(), 3, "{missing:?}");
}

/// For each mode, each alternative of each documented permission is needed:
/// a user lacking just that one fails with ACCESS_REFUSED on the resource
/// it covers. With the happy paths above (which use exactly these
/// permissions) this shows the documented permissions are the minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_permission_is_needed() {
    let node = private_node(NodeOptions::default()).await;
    let url = node.url();

    struct Case {
        what: String,
        user: String,
        perms: [String; 3],
        env: TestEnv,
        /// The resource the broker must name in its refusal.
        resource: String,
        submit: bool,
        mode: Mode,
    }
    let columns = ["configure", "write", "read"];
    let plans: [(Mode, bool); 3] = [
        (Mode::Declare, false),
        (Mode::Managed, false),
        (Mode::Managed, true),
    ];
    let plan_for = |mode: Mode, submit: bool, t: &Topology| {
        if submit {
            submit_wait_permissions(&t.events_exchange)
        } else {
            worker_permissions(mode, &t.request_queue, &t.events_exchange)
        }
    };
    // (mode, submit, column, index of the dropped alternative)
    let mut drops = Vec::new();
    for (mode, submit) in plans {
        let example = plan_for(mode, submit, &Topology::new(&Settings::default()));
        for (col, alternatives) in example.iter().enumerate() {
            for i in 0..alternatives.len() {
                drops.push((mode, submit, col, i));
            }
        }
    }
    let envs = futures_util::future::join_all(drops.iter().map(|_| {
        TestEnv::with("perm", sim(Duration::from_millis(200)), |s| {
            s.amqp.url = url.clone().into()
        })
    }))
    .await;
    let mut cases: Vec<Case> = Vec::new();
    for ((mode, submit, col, i), env) in drops.into_iter().zip(envs) {
        if mode == Mode::Declare {
            // The worker creates the topology, as on its first start
            // (RabbitMQ checks some permissions only when creating).
            delete_topology(&env).await;
        }
        let t = &env.topology;
        let mut perms = plan_for(mode, submit, t);
        let dropped = perms[col].remove(i);
        let resource = match dropped.as_str() {
            "amq\\.default" => "exchange 'amq.default'".to_owned(),
            "amq\\.gen-.+" => "queue 'amq.gen-".to_owned(),
            d if d == escape(&t.events_exchange) => format!("exchange '{}'", t.events_exchange),
            d if d.ends_with("(\\..+)?") => format!("queue '{}'", t.dead_queue),
            d if d.ends_with("\\.tracking") => format!("queue '{}'", t.tracking_queue),
            d if d.ends_with("\\.wait\\..+") => format!("queue '{}'", t.wait_queues[0].1),
            d if d.ends_with("\\.journal") => format!("queue '{}'", t.journal_queue),
            d if d.ends_with("\\.cancel") => format!("queue '{}'", t.cancel_queue),
            d if d.contains("(claim|quota)") => format!("queue '{}.claim.", t.request_queue),
            _ => format!("queue '{}'", t.request_queue),
        };
        cases.push(Case {
            what: format!(
                "{mode:?}{} without {} {dropped}",
                if submit { " submit --wait" } else { "" },
                columns[col]
            ),
            user: format!("u{}", cases.len()),
            perms: regexps(&perms),
            env,
            resource,
            submit,
            mode,
        });
    }
    let users: Vec<(&str, &str, [String; 3])> = cases
        .iter()
        .map(|c| (c.user.as_str(), "pw", c.perms.clone()))
        .collect();
    node.import_definitions_json(&users_json("/", &users))
        .expect("import definitions");

    let node = &node;
    let runs = cases.iter().map(|case| async move {
        let mut env_vars = case.env.worker_env();
        set(
            &mut env_vars,
            "VIDU_WORKER__AMQP__URL",
            &node.url_for(&case.user, "pw", "%2f"),
        );
        if case.mode == Mode::Managed {
            set(
                &mut env_vars,
                "VIDU_WORKER__AMQP__DECLARE_TOPOLOGY",
                "false",
            );
        }
        let output = if case.submit {
            let (_, stdout, stderr) = cli(
                &[
                    "submit",
                    "--image",
                    "https://example.com/cat.png",
                    "--wait",
                    "--timeout",
                    "20s",
                ],
                &env_vars,
            )
            .await;
            format!("{stdout}\n{stderr}")
        } else {
            let worker = case.env.spawn_worker(&as_refs(&env_vars));
            // Some permissions are only needed once a request flows: send
            // one as soon as the request queue exists.
            let published = std::sync::atomic::AtomicBool::new(false);
            eventually(
                Duration::from_secs(40),
                &format!("ACCESS_REFUSED for {}", case.what),
                || async {
                    let logs = worker.logs();
                    if logs
                        .iter()
                        .any(|l| l.contains("ACCESS_REFUSED") && l.contains(&case.resource))
                    {
                        return Some(logs.join("\n"));
                    }
                    let queue_exists = case.mode == Mode::Managed
                        || matches!(worker.get("/readyz").await, Some((200, _)));
                    if queue_exists && !published.swap(true, Ordering::SeqCst) {
                        case.env.publish(&request("p-1", "permissions")).await;
                    }
                    None
                },
            )
            .await
        };
        (case, output)
    });
    let results = futures_util::future::join_all(runs).await;
    let mut failures = Vec::new();
    for (case, output) in &results {
        let refused = output
            .lines()
            .any(|l| l.contains("ACCESS_REFUSED") && l.contains(&case.resource));
        if !refused {
            failures.push(format!(
                "{} ({:?}): expected ACCESS_REFUSED naming {}, got:\n{output}",
                case.what, case.perms, case.resource
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(results.len(), 9 + 6 + 6, "every alternative was tried");
}

// ---------------------------------------------------------------------------
// Queue arguments and mismatches
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_settings_that_differ_from_existing_queues_fail_at_start_naming_the_argument() {
    // Existing classic queues, a worker configured for quorum queues.
    let classic = TestEnv::with("mismatch", sim(Duration::from_millis(200)), |s| {
        s.amqp.queue_type = QueueType::Classic
    })
    .await;
    let mut worker = classic.spawn_worker(&[("VIDU_WORKER__AMQP__QUEUE_TYPE", "quorum")]);
    let code = worker.wait_exit(Duration::from_secs(30)).await;
    let logs = worker.logs().join("\n");
    assert_eq!(code, Some(1), "{logs}");
    assert!(
        logs.contains(&format!(
            "cannot declare queue {}",
            classic.topology.dead_queue
        )),
        "{logs}"
    );
    assert!(
        logs.contains("inequivalent arg 'x-queue-type'")
            && logs.contains("received 'quorum' but current is 'classic'"),
        "{logs}"
    );
    assert!(
        logs.contains("amqp.queue_type"),
        "says what to align: {logs}"
    );

    // The delivery limit follows amqp.max_deliveries (+2).
    let quorum = TestEnv::new("mismatch", sim(Duration::from_millis(200))).await;
    let mut worker = quorum.spawn_worker(&[("VIDU_WORKER__AMQP__MAX_DELIVERIES", "5")]);
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await, Some(1));
    let logs = worker.logs().join("\n");
    assert!(
        logs.contains("inequivalent arg 'x-delivery-limit'")
            && logs.contains("received '7' but current is '12'"),
        "{logs}"
    );

    // An extra argument the existing queues do not have.
    let mut worker =
        quorum.spawn_worker(&[("VIDU_WORKER__AMQP__QUEUE_ARGUMENTS__X-MAX-LENGTH", "1000")]);
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await, Some(1));
    let logs = worker.logs().join("\n");
    assert!(logs.contains("inequivalent arg 'x-max-length'"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_type_and_extra_arguments_are_applied_to_every_queue() {
    let node = private_node(NodeOptions::default()).await;
    let url = node.url();
    // Classic queues with an extra argument, declared by the worker itself.
    let env = TestEnv::with("qargs", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into();
        s.amqp.queue_type = QueueType::Classic;
        s.amqp.queue_arguments.insert(
            "x-queue-mode".into(),
            vidu_worker::config::QueueArgument::Text("lazy".into()),
        );
    })
    .await;
    delete_topology(&env).await;
    let worker = env.start_worker().await;
    let tap = env.tap().await;
    env.publish(&request("c-1", "classic")).await;
    assert_eq!(
        tap.wait_terminal("c-1", Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );
    let listed = ctl(
        &node,
        &[
            "list_queues",
            "name",
            "type",
            "arguments",
            "-q",
            "--no-table-headers",
        ],
    );
    for name in env.topology.queue_names() {
        let line = listed
            .lines()
            .find(|l| l.split('\t').next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} in:\n{listed}"));
        if name == env.topology.journal_queue {
            // A stream, whatever the queues' type and arguments.
            assert!(line.contains("\tstream\t"), "{line}");
            assert!(!line.contains("x-queue-mode"), "{line}");
            continue;
        }
        assert!(line.contains("\tclassic\t"), "{line}");
        assert!(line.contains("{\"x-queue-mode\",\"lazy\"}"), "{line}");
        assert!(!line.contains("x-delivery-limit"), "classic: {line}");
    }
    drop(worker);

    // Quorum queues (the default) carry x-delivery-limit = max_deliveries + 2.
    let env = TestEnv::with("qlimit", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into();
        s.amqp.max_deliveries = 4;
    })
    .await;
    delete_topology(&env).await;
    let _worker = env.start_worker().await;
    let listed = ctl(
        &node,
        &[
            "list_queues",
            "name",
            "type",
            "arguments",
            "-q",
            "--no-table-headers",
        ],
    );
    for name in [&env.topology.request_queue, &env.topology.tracking_queue] {
        let line = listed
            .lines()
            .find(|l| l.split('\t').next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} in:\n{listed}"));
        assert!(line.contains("\tquorum\t"), "{line}");
        assert!(line.contains("{\"x-delivery-limit\",6}"), "{line}");
    }
}

// ---------------------------------------------------------------------------
// Connection identity
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_can_find_a_worker_by_host_and_process() {
    let node = private_node(NodeOptions::default()).await;
    let url = node.url();
    let env = TestEnv::with("identity", sim(Duration::from_millis(200)), |s| {
        s.amqp.url = url.clone().into()
    })
    .await;
    let host = format!(
        "vidu-pod-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let worker = env.start_worker_with(&[("HOSTNAME", &host)]).await;
    let pid = worker.pid();

    let line = worker_connection(&node, pid, &[]);
    for property in [
        format!(
            "{{\"connection_name\",\"vidu-worker worker {host}#{pid} {}\"}}",
            env.topology.request_queue
        ),
        "{\"product\",\"vidu-worker\"}".to_owned(),
        format!("{{\"host\",\"{host}\"}}"),
        format!("{{\"pid\",\"{pid}\"}}"),
        format!("{{\"request_queue\",\"{}\"}}", env.topology.request_queue),
    ] {
        assert!(line.contains(&property), "{property} in {line}");
    }

    let consumers = ctl(
        &node,
        &[
            "list_consumers",
            "queue_name",
            "consumer_tag",
            "-q",
            "--no-table-headers",
        ],
    );
    let expected = format!(
        "{}\tvidu-worker.{host}.{pid}.tracking",
        env.topology.tracking_queue
    );
    assert!(
        consumers.lines().any(|l| l.starts_with(&expected)),
        "{expected:?} in:\n{consumers}"
    );
    // Requests are taken with basic.get, once a create could follow: the
    // request queue has no consumer to find.
    assert!(
        !consumers
            .lines()
            .any(|l| l.starts_with(&format!("{}\t", env.topology.request_queue))),
        "no consumer on the request queue:\n{consumers}"
    );
}

// ---------------------------------------------------------------------------
// Upstream: extra CA and proxies
// ---------------------------------------------------------------------------

/// A TLS terminator in front of a plain HTTP backend, counting handshakes.
struct TlsFront {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    async fn start(server: &Issued, backend: SocketAddr) -> Self {
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone())),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (a, r) = (accepted.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, a, r) = (acceptor.clone(), a.clone(), r.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            a.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut up) = TcpStream::connect(backend).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                            }
                        }
                        Err(_) => {
                            r.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            refused,
            task,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal forward proxy: absolute-form HTTP requests (forwarded with
/// `Connection: close`) and CONNECT tunnels. Records each request line.
struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = proxy_one(client, log).await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_one(client: TcpStream, log: Arc<Mutex<Vec<String>>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let request_line = request_line.trim_end().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        headers.push(line);
    }
    log.lock().expect("lock").push(request_line.clone());
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "CONNECT" {
        let mut upstream = TcpStream::connect(target).await?;
        let mut client = reader.into_inner();
        client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        return Ok(());
    }
    let rest = target.strip_prefix("http://").unwrap_or(target);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut upstream = TcpStream::connect(authority).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    let mut length = 0usize;
    for h in &headers {
        let lower = h.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("proxy-connection:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        head.push_str(h);
    }
    head.push_str("Connection: close\r\n\r\n");
    upstream.write_all(head.as_bytes()).await?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    upstream.write_all(&body).await?;
    let mut client = reader.into_inner();
    tokio::io::copy(&mut upstream, &mut client).await?;
    client.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upstream_is_reached_through_an_https_proxy_with_an_extra_ca() {
    let env = TestEnv::new("upstreamtls", sim(Duration::from_millis(300))).await;
    let ca = Ca::new("corporate proxy CA");
    let front = TlsFront::start(
        &ca.issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth),
        env.sim.addr(),
    )
    .await;
    let proxy = Proxy::start().await;
    let files = Files::new();
    let ca_file = files.write("corporate-ca.pem", &ca.pem());
    let https_base = format!("https://localhost:{}", front.addr.port());
    let mut worker_env = owned(&[
        ("VIDU_WORKER__UPSTREAM__BASE_URL", &https_base),
        ("HTTPS_PROXY", &proxy.url()),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ]);
    let tap = env.tap().await;
    let worker = env
        .start_worker_with(&as_refs(
            &[
                worker_env.clone(),
                owned(&[("VIDU_WORKER__UPSTREAM__CA_FILE", &ca_file)]),
            ]
            .concat(),
        ))
        .await;
    env.publish(&request("u-1", "through the proxy")).await;
    let done = tap.wait_terminal("u-1", Duration::from_secs(30)).await;
    assert_eq!(done.kind(), SUCCEEDED, "{:?}", done.body);
    let tunnel = format!("CONNECT localhost:{} HTTP/1.1", front.addr.port());
    assert!(
        proxy.seen().iter().any(|l| l == &tunnel),
        "{tunnel} in {:?}",
        proxy.seen()
    );
    assert!(front.accepted.load(Ordering::SeqCst) >= 1);
    assert!(env.sim.stats().tasks_created >= 1);
    drop(worker);

    // Without the extra CA the same endpoint is refused (system roots only).
    let refused_before = front.refused.load(Ordering::SeqCst);
    let mut check_env = env.worker_env();
    for (k, v) in worker_env.drain(..) {
        set(&mut check_env, &k, &v);
    }
    let (code, stdout, _) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL upstream"), "{stdout}");
    eventually(
        Duration::from_secs(10),
        "the upstream TLS handshake to be refused",
        || async { (front.refused.load(Ordering::SeqCst) > refused_before).then_some(()) },
    )
    .await;
    set(&mut check_env, "VIDU_WORKER__UPSTREAM__CA_FILE", &ca_file);
    let (code, stdout, _) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(0), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_proxy_comes_from_the_standard_environment_variables() {
    let env = TestEnv::new("proxy", sim(Duration::from_millis(300))).await;
    let proxy = Proxy::start().await;
    let tap = env.tap().await;
    let _worker = env
        .start_worker_with(&[
            ("HTTP_PROXY", &proxy.url()),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
        ])
        .await;
    env.publish(&request("x-1", "proxied")).await;
    let done = tap.wait_terminal("x-1", Duration::from_secs(30)).await;
    assert_eq!(done.kind(), SUCCEEDED, "{:?}", done.body);
    let seen = proxy.seen();
    let base = env.sim.base_url();
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("POST {base}{} ", Model::DEFAULT.create_path()))),
        "create through the proxy: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("GET {base}{RESULT_PATH}?task_id="))),
        "polls through the proxy: {seen:?}"
    );

    // NO_PROXY exempts the host: `check` reaches the simulator directly.
    let before = proxy.seen().len();
    let mut check_env = env.worker_env();
    set(&mut check_env, "HTTP_PROXY", &proxy.url());
    set(&mut check_env, "NO_PROXY", "127.0.0.1");
    let (code, stdout, _) = cli(&["check"], &check_env).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("accepts the API key"), "{stdout}");
    assert_eq!(proxy.seen().len(), before, "{:?}", proxy.seen());
}

// ---------------------------------------------------------------------------
// The shipped definitions and documentation
// ---------------------------------------------------------------------------

pub(crate) fn shipped_definitions_path() -> PathBuf {
    files::repo_path("deploy/rabbitmq/definitions.json")
}

fn set_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
}

pub(crate) fn amqp_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Boolean(b) => json!(b),
        other => panic!("unexpected argument type {other:?}"),
    }
}

#[test]
fn the_shipped_definitions_are_exactly_the_default_topology() {
    let text = std::fs::read_to_string(shipped_definitions_path()).expect("definitions.json");
    let file: Value = serde_json::from_str(&text).expect("valid JSON");
    let topology = Topology::new(&Settings::default());

    assert_eq!(
        file["exchanges"],
        json!([{
            "name": "vidu.events", "vhost": "/", "type": "topic", "durable": true,
            "auto_delete": false, "internal": false, "arguments": {}
        }])
    );
    assert_eq!(file["bindings"], json!([]), "the worker needs no bindings");
    let expected: Vec<Value> = topology
        .queue_declarations()
        .iter()
        .map(|(name, args)| {
            let arguments: serde_json::Map<String, Value> = args
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_json(v)))
                .collect();
            json!({"name": name, "vhost": "/", "durable": true, "auto_delete": false,
                   "arguments": arguments})
        })
        .collect();
    assert_eq!(file["queues"], Value::Array(expected));
    let keys: Vec<&String> = file.as_object().expect("object").keys().collect();
    assert_eq!(
        keys.len(),
        3,
        "only topology, no users or secrets: {keys:?}"
    );
}

#[test]
fn the_documented_permissions_are_the_tested_ones() {
    let readme = files::read("deploy/rabbitmq/README.md");
    for perms in [
        worker_permissions(Mode::Declare, "vidu.requests", "vidu.events"),
        worker_permissions(Mode::Managed, "vidu.requests", "vidu.events"),
        submit_wait_permissions("vidu.events"),
    ] {
        for re in regexps(&perms) {
            assert!(readme.contains(&format!("'{re}'")), "{re} is documented");
        }
    }
}

/// The threat model's recommended producer setup: an ingress exchange bound
/// only to the request queue, and a producer that may write only to it.
/// Its requests are served; it cannot reach any internal queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_with_only_an_ingress_exchange_cannot_reach_internal_queues() {
    let node = private_node(NodeOptions::default()).await;
    let url = node.url();
    let env = TestEnv::with("ingress", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into()
    })
    .await;
    let ingress = format!("{}.ingress", env.name);
    env.channel
        .exchange_declare(
            ingress.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("ingress exchange");
    env.channel
        .queue_bind(
            env.topology.request_queue.as_str().into(),
            ingress.as_str().into(),
            env.topology.request_queue.as_str().into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("bind");
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    node.import_definitions_json(&users_json(
        "/",
        &[(
            "producer",
            password.as_str(),
            ["^$".into(), format!("^{}$", escape(&ingress)), "^$".into()],
        )],
    ))
    .expect("import definitions");
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    let producer = Arc::new(
        lapin::Connection::connect(
            &node.url_for("producer", &password, "%2f"),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("the producer connects"),
    );
    let publish = |exchange: String, key: String| {
        let producer = producer.clone();
        async move {
            let publisher = vidu_worker::broker::Publisher::open(producer)
                .await
                .expect("channel");
            let body =
                serde_json::to_vec(&request("via-ingress", "through the ingress")).expect("json");
            publisher
                .publish(
                    &exchange,
                    &key,
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                    true,
                )
                .await
        }
    };
    publish(ingress.clone(), env.topology.request_queue.clone())
        .await
        .expect("the ingress takes requests");
    assert_eq!(
        tap.wait_terminal("via-ingress", Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );
    for queue in [
        env.topology.tracking_queue.clone(),
        env.topology.wait_queues[0].1.clone(),
        env.topology.dead_queue.clone(),
    ] {
        // Through the default exchange: refused (403, the channel closes).
        let refused = publish(String::new(), queue.clone()).await;
        assert!(refused.is_err(), "{queue}: {refused:?}");
        // Through the ingress: its one binding does not lead there.
        let stray = publish(ingress.clone(), queue.clone()).await;
        assert!(
            matches!(stray, Err(vidu_worker::broker::PublishError::Unroutable(_))),
            "{queue}: {stray:?}"
        );
    }
    assert_eq!(env.depth(&env.topology.tracking_queue).await, 0);
}
