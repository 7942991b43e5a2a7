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
    ffi::{OsStr, OsString},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

pub mod cluster;
pub mod node;

pub use cluster::{queue_leaders, start_cluster, DEAD_LETTER_CONFIRM_TIMEOUT_MS};
pub use node::{LocalNode, NodeOptions, NodeTls};

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

/// The RabbitMQ commands of this machine.
#[derive(Debug, Clone)]
pub struct Installation {
    server: PathBuf,
    ctl: PathBuf,
    epmd: Option<PathBuf>,
}

impl Installation {
    /// `rabbitmq-server` and `rabbitmqctl` on `PATH` (and `epmd`, when it
    /// is there too), or `None` when `rabbitmq-server` is not.
    ///
    /// The Debian package's commands are a wrapper that runs the real ones
    /// as user `rabbitmq` and refuses anyone but root and `rabbitmq`: other
    /// users get the real commands next to the wrapper, run as themselves.
    pub fn find() -> Option<Self> {
        let path = std::env::var_os("PATH")?;
        Self::find_in(&path, is_root())
    }

    fn find_in(path: &OsStr, root: bool) -> Option<Self> {
        let on_path = |name: &str| {
            std::env::split_paths(path)
                .map(|dir| dir.join(name))
                .find(|p| is_executable(p))
        };
        let server = on_path("rabbitmq-server")?;
        let beside = server.parent().map(|d| d.join("rabbitmqctl"));
        let ctl = beside
            .filter(|p| is_executable(p))
            .or_else(|| on_path("rabbitmqctl"))?;
        let mut found = Self {
            server,
            ctl,
            epmd: on_path("epmd"),
        };
        if !root {
            if let Ok(real) = std::fs::canonicalize(&found.server) {
                if real.file_name() == Some(OsStr::new("rabbitmq-script-wrapper")) {
                    if let Some(bin) = real.parent() {
                        let (server, ctl) = (bin.join("rabbitmq-server"), bin.join("rabbitmqctl"));
                        if is_executable(&server) && is_executable(&ctl) {
                            found.server = server;
                            found.ctl = ctl;
                        }
                    }
                }
            }
        }
        Some(found)
    }

    /// Whether epmd runs (answers `epmd -names`); `None` when there is no
    /// `epmd` to ask.
    fn epmd_running(&self) -> Option<bool> {
        let epmd = self.epmd.as_ref()?;
        quiet(Command::new(epmd).arg("-names"))
            .status()
            .ok()
            .map(|s| s.success())
    }
}

/// The user a private node runs as: this process's, or, when root starts
/// the Debian package's wrapper, the package's `rabbitmq` user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeUser {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl NodeUser {
    /// The user `tools.server` runs the node as.
    pub fn of(tools: &Installation) -> Result<Self, String> {
        let wrapped = std::fs::canonicalize(&tools.server)
            .ok()
            .is_some_and(|real| real.file_name() == Some(OsStr::new("rabbitmq-script-wrapper")));
        if is_root() && wrapped {
            return user_named("rabbitmq").ok_or_else(|| {
                "the rabbitmq-server wrapper runs the node as user rabbitmq, which does not exist"
                    .to_owned()
            });
        }
        Ok(current_user())
    }
}

/// The current process's user and group (from `/proc/self`).
#[cfg(unix)]
fn current_user() -> NodeUser {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(NodeUser { uid: 0, gid: 0 }, |m| NodeUser {
        uid: m.uid(),
        gid: m.gid(),
    })
}

#[cfg(not(unix))]
fn current_user() -> NodeUser {
    NodeUser { uid: 0, gid: 0 }
}

/// A user's ids from `/etc/passwd`.
fn user_named(name: &str) -> Option<NodeUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        let _password = fields.next()?;
        Some(NodeUser {
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

/// Creates a private node's directory: new (never one that exists, which
/// someone else could have prepared), mode 0700, this process's until
/// [`hand_over_node_dir`] gives it to the node's user, so that no other
/// local user can read or replace anything in it.
pub fn create_node_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        format!(
            "cannot create the private RabbitMQ node's directory {}: {e}",
            dir.display()
        )
    })
}

/// Gives a node's directory (once its configuration is written) to the
/// user the node runs as, which must write its data, logs and pid there.
pub fn hand_over_node_dir(dir: &Path, owner: NodeUser) -> Result<(), String> {
    #[cfg(unix)]
    if owner != current_user() {
        std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid))
            .map_err(|e| format!("cannot give {} to the node's user: {e}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (dir, owner);
    Ok(())
}

/// Writes a new file into a node's directory (failing if it exists), with
/// mode 0644, owned by this process: the node reads it, nobody else writes
/// it.
pub fn write_node_file(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o644);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `pid` if it is the VM of node `name` run by `owner`, checked before any
/// signal is sent to it: a number above 1, a process of that user, an
/// Erlang VM (`beam` on its command line) whose environment names the node.
/// A pid file is a claim anyone able to write it could make; this is how
/// the claim is checked.
pub fn verified_vm_pid(pid: i64, name: &str, owner: NodeUser) -> Result<u32, String> {
    let pid = u32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("{pid} is not the pid of a node's VM"))?;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status"))
        .map_err(|_| format!("no process {pid}"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse::<u32>().ok());
    if uid != Some(owner.uid) {
        return Err(format!("process {pid} is not run by the node's user"));
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    if !String::from_utf8_lossy(program).contains("beam") {
        return Err(format!("process {pid} is not an Erlang VM"));
    }
    let environ = std::fs::read(proc_dir.join("environ")).unwrap_or_default();
    let wanted = format!("RABBITMQ_NODENAME={name}");
    if !environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()) {
        return Err(format!("process {pid} is not node {name}'s VM"));
    }
    Ok(pid)
}

/// The environment that makes `rabbitmq-server` and `rabbitmqctl` address
/// a private node: its name, AMQP port, and its files in `dir`
/// (`rabbitmq.conf`, the optional `advanced.config`, data, logs, pid file,
/// plugins list), with the Erlang distribution (the node's port + 20000,
/// and the CLI's own) and an epmd the node starts bound to 127.0.0.1 only.
/// Every private node of the project, the demo's and the tests' and the
/// benchmark's, is run with it.
pub fn node_env(name: &str, port: u16, dir: &Path) -> Vec<(&'static str, OsString)> {
    let d = |s: &str| dir.join(s).into_os_string();
    const LOOPBACK_DIST: &str = "-kernel inet_dist_use_interface {127,0,0,1}";
    vec![
        ("RABBITMQ_NODENAME", name.into()),
        ("RABBITMQ_NODE_PORT", port.to_string().into()),
        ("RABBITMQ_CONFIG_FILE", d("rabbitmq")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config")),
        ("RABBITMQ_MNESIA_BASE", d("mnesia")),
        ("RABBITMQ_LOG_BASE", d("log")),
        ("RABBITMQ_PID_FILE", d("pid")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", LOOPBACK_DIST.into()),
        ("RABBITMQ_CTL_ERL_ARGS", LOOPBACK_DIST.into()),
    ]
}

/// The `rabbitmq.conf` of a private node: AMQP on 127.0.0.1:`port` only,
/// and `guest` allowed (it is local).
pub fn node_config(port: u16) -> String {
    format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n")
}

/// A free port on 127.0.0.1 whose port + 20000 (the node's Erlang
/// distribution port) is free too.
pub fn free_port() -> Result<u16, String> {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..500 {
        let port: u16 = rand::random_range(20_000..45_000);
        if free(port) && free(port + 20_000) {
            return Ok(port);
        }
    }
    Err("no free pair of ports (P and P + 20000) on 127.0.0.1 for a private RabbitMQ node".into())
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    let exists = quiet(Command::new("kill").args(["-0", &pid.to_string()]))
        .status()
        .is_ok_and(|s| s.success());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state == 'Z')
        })
        .unwrap_or(false);
    exists && !zombie
}

/// Discards a command's stdio and, on Unix, gives it a process group of its
/// own (a Ctrl-C on the terminal is for the caller, which stops the node in
/// order).
fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd
}

#[cfg(all(unix, test))]
fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))
}

#[cfg(all(not(unix), test))]
fn set_mode(_: &Path, _: u32) -> Result<(), String> {
    Ok(())
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// Whether this process runs as root (the owner of its `/proc` entry).
#[cfg(unix)]
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(not(unix))]
fn is_root() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

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
