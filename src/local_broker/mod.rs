//! A private RabbitMQ node for a first run. When the broker is left to the
//! built-in default (`amqp.url` set by no configuration layer) and nothing
//! answers on 127.0.0.1:5672, the demo and the integration tests need not
//! fail: they start the machine's `rabbitmq-server` as a node of their own
//! (its own node name, a free AMQP port whose Erlang distribution port, the
//! AMQP port + 20000, is free too, and a fresh temporary directory for its
//! configuration, data and logs), use it, and afterwards stop it, remove
//! its directory and stop the epmd it started, so that nothing is left
//! running. [`decide`] is that choice as a plain function; [`LocalNode`]
//! (in [`node`]) starts, awaits and stops a node (also on drop),
//! [`LocalNode::stop_when_process_exits`] leaves a watcher process that
//! does the same once a given process is gone, however it ended, and
//! [`cluster`] joins nodes into a cluster. The tests and the benchmark use
//! the same nodes, with the options they need. Every call blocks (async
//! callers use `spawn_blocking`), errors are one line, and the module
//! prints nothing and knows nothing of the commands that use it.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

pub mod cluster;
pub mod node;
pub mod setup;

pub use cluster::{queue_leaders, start_cluster, DEAD_LETTER_CONFIRM_TIMEOUT_MS};
pub use node::{LocalNode, NodeOptions, NodeTls};
pub use setup::{
    create_node_dir, free_port, hand_over_node_dir, node_config, node_env, verified_vm_pid,
    write_node_file, Installation, NodeUser,
};

/// The address of the broker the built-in default `amqp.url` names.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    5672,
));

/// How long [`default_broker_answers`] waits for a TCP connection.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a caller should give a node to start (see
/// [`LocalNode::await_startup`]).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// What to say, in one line, when no broker answers and RabbitMQ is not
/// installed.
pub const INSTALL_HINT: &str = "no broker answers on 127.0.0.1:5672 and rabbitmq-server is not installed (not on PATH): install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server; macOS: brew install rabbitmq) or run one in a container (docker run -d -p 5672:5672 rabbitmq:3), or set amqp.url to a broker that runs";

/// What to do about the broker before connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Use the configured broker: one the user set, or the default one,
    /// which answers.
    UseConfigured,
    /// Start a private node and use it instead of the default broker.
    StartPrivateNode,
    /// Say how to install RabbitMQ, and fail.
    ExplainInstall,
}

/// The choice: a broker the user configured is always used as it is (even
/// when it does not answer, and even when it is the default URL); the
/// default broker is used when it answers; otherwise a private node is
/// started when `rabbitmq-server` is installed, and the user is told how to
/// install it when not.
pub fn decide(url_was_set: bool, broker_answers: bool, server_installed: bool) -> Action {
    match (url_was_set, broker_answers, server_installed) {
        (true, _, _) | (false, true, _) => Action::UseConfigured,
        (false, false, true) => Action::StartPrivateNode,
        (false, false, false) => Action::ExplainInstall,
    }
}

/// Whether something accepts a TCP connection on `addr` within `timeout`.
pub fn answers(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

/// Whether something answers on [`DEFAULT_ADDR`] (within [`PROBE_TIMEOUT`]).
pub fn default_broker_answers() -> bool {
    answers(DEFAULT_ADDR, PROBE_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use setup::{current_user, set_mode};
    use std::ffi::OsString;
    use std::net::TcpListener;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    #[test]
    fn a_private_node_only_replaces_an_unset_url_that_nothing_answers() {
        use Action::*;
        // (url_was_set, broker_answers, server_installed) -> action
        let table = [
            ((true, true, true), UseConfigured),
            ((true, true, false), UseConfigured),
            // Set by the user: used as it is, even when it does not answer.
            ((true, false, true), UseConfigured),
            ((true, false, false), UseConfigured),
            // The default broker answers: it is used.
            ((false, true, true), UseConfigured),
            ((false, true, false), UseConfigured),
            ((false, false, true), StartPrivateNode),
            ((false, false, false), ExplainInstall),
        ];
        for ((set, answers, installed), want) in table {
            assert_eq!(
                decide(set, answers, installed),
                want,
                "url_was_set={set} broker_answers={answers} server_installed={installed}"
            );
        }
    }

    #[test]
    fn the_install_hint_is_one_line_naming_each_way_to_install() {
        assert!(!INSTALL_HINT.contains('\n'));
        for needle in [
            "sudo apt-get install rabbitmq-server",
            "brew install rabbitmq",
            "docker run -d -p 5672:5672 rabbitmq:3",
        ] {
            assert!(INSTALL_HINT.contains(needle), "{needle}");
        }
    }

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vidu-local-broker-{test}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn executable(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write");
        set_mode(path, 0o755).expect("chmod");
    }

    #[cfg(unix)]
    #[test]
    fn the_commands_are_found_on_the_path_and_the_debian_wrapper_is_skipped_unless_root() {
        let root = temp_dir("find");
        let (empty, sbin, lib) = (root.join("empty"), root.join("sbin"), root.join("lib"));
        for d in [&empty, &sbin, &lib] {
            std::fs::create_dir_all(d).expect("dir");
        }
        let path = |dirs: &[&Path]| std::env::join_paths(dirs).expect("a PATH");
        assert!(Installation::find_in(&path(&[&empty]), false).is_none());

        // A wrapper like the Debian package's, next to the real commands.
        executable(&lib.join("rabbitmq-script-wrapper"), "#!/bin/sh\n");
        executable(&lib.join("rabbitmq-server"), "#!/bin/sh\n");
        executable(&lib.join("rabbitmqctl"), "#!/bin/sh\n");
        for name in ["rabbitmq-server", "rabbitmqctl"] {
            std::os::unix::fs::symlink(lib.join("rabbitmq-script-wrapper"), sbin.join(name))
                .expect("symlink");
        }
        let as_root = Installation::find_in(&path(&[&empty, &sbin]), true).expect("found");
        assert_eq!(as_root.server, sbin.join("rabbitmq-server"));
        assert_eq!(as_root.ctl, sbin.join("rabbitmqctl"));
        let as_user = Installation::find_in(&path(&[&empty, &sbin]), false).expect("found");
        assert_eq!(as_user.server, lib.join("rabbitmq-server"));
        assert_eq!(as_user.ctl, lib.join("rabbitmqctl"));

        // Not executable: not a command.
        let plain = root.join("plain");
        std::fs::create_dir_all(&plain).expect("dir");
        std::fs::write(plain.join("rabbitmq-server"), "").expect("write");
        assert!(Installation::find_in(&path(&[&plain]), true).is_none());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_node_keeps_every_file_in_its_directory_and_listens_on_loopback_only() {
        let dir = Path::new("/node-dir");
        let env = node_env("n1@localhost", 35672, dir);
        assert_eq!(
            env[0],
            ("RABBITMQ_NODENAME", OsString::from("n1@localhost"))
        );
        assert_eq!(env[1], ("RABBITMQ_NODE_PORT", OsString::from("35672")));
        for (key, value) in &env[2..8] {
            assert!(
                Path::new(value).starts_with(dir),
                "{key} = {}",
                Path::new(value).display()
            );
        }
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("ERL_EPMD_ADDRESS"), Some("127.0.0.1".into()));
        for key in [
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "RABBITMQ_CTL_ERL_ARGS",
        ] {
            assert_eq!(
                get(key),
                Some("-kernel inet_dist_use_interface {127,0,0,1}".into()),
                "{key}"
            );
        }
        assert_eq!(
            node_config(35672),
            "listeners.tcp.local = 127.0.0.1:35672\nloopback_users = none\n"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_pid_is_a_nodes_vm_only_when_the_process_says_so() {
        let me = current_user();
        let mut sleeper = Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = i64::from(sleeper.id());
        // (pid, node, expected error fragment)
        let cases = [
            (-1, "n@localhost", "not the pid"),
            (0, "n@localhost", "not the pid"),
            (1, "n@localhost", "not the pid"),
            (i64::from(u32::MAX) + 1, "n@localhost", "not the pid"),
            (pid, "n@localhost", "not an Erlang VM"),
        ];
        for (pid, node, fragment) in cases {
            let err = verified_vm_pid(pid, node, me).expect_err("refused");
            assert!(err.contains(fragment), "{pid}: {err}");
        }
        let other = NodeUser {
            uid: me.uid.wrapping_add(1),
            gid: me.gid,
        };
        let err = verified_vm_pid(pid, "n@localhost", other).expect_err("other user");
        assert!(err.contains("not run by the node's user"), "{err}");
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }

    #[cfg(unix)]
    #[test]
    fn node_files_are_new_and_the_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = temp_dir("nodedir");
        let dir = root.join("node");
        create_node_dir(&dir).expect("created");
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(create_node_dir(&dir).is_err(), "never reused");
        hand_over_node_dir(&dir, current_user()).expect("ours already");
        let conf = dir.join("rabbitmq.conf");
        write_node_file(&conf, "x = 1\n").expect("written");
        assert!(write_node_file(&conf, "y = 2\n").is_err(), "never replaced");
        assert_eq!(std::fs::read_to_string(&conf).expect("read"), "x = 1\n");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn nothing_answers_on_a_port_just_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert!(answers(addr, PROBE_TIMEOUT));
        drop(listener);
        assert!(!answers(addr, PROBE_TIMEOUT));
    }
}
