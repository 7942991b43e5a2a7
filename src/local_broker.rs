//! A private RabbitMQ node for a first run. When the broker is left to the
//! built-in default (`amqp.url` set by no configuration layer) and nothing
//! answers on 127.0.0.1:5672, the demo and the integration tests need not
//! fail: they start the machine's `rabbitmq-server` as a node of their own
//! (its own node name, a free AMQP port whose Erlang distribution port, the
//! AMQP port + 20000, is free too, and a fresh temporary directory for its
//! configuration, data and logs), use it, and afterwards stop it, remove
//! its directory and stop the epmd it started, so that nothing is left
//! running. [`decide`] is that choice as a plain function; [`LocalNode`]
//! starts, awaits and stops a node (also on drop), and
//! [`LocalNode::stop_when_process_exits`] leaves a watcher process that
//! does the same once a given process is gone, however it ended. Every call
//! blocks (async callers use `spawn_blocking`), errors are one line, and
//! the module prints nothing and knows nothing of the commands that use it.

use std::{
    ffi::OsStr,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
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

/// A RabbitMQ node of this process's own, on 127.0.0.1 and a free port,
/// with its data in a temporary directory. Stopped and removed by
/// [`LocalNode::stop`] or on drop.
#[derive(Debug)]
pub struct LocalNode {
    name: String,
    port: u16,
    dir: PathBuf,
    tools: Installation,
    /// Whether epmd did not run before this node started (so this node
    /// started it, and stopping the node stops it too).
    started_epmd: bool,
    /// Whether `rabbitmq-server -detached` succeeded (a VM may run).
    launched: bool,
    stopped: AtomicBool,
}

impl LocalNode {
    /// Starts a node named `PREFIX-XXXXXXXX@localhost` and waits (up to
    /// `timeout`) until it runs; a node that does not come up is stopped
    /// and removed.
    pub fn start(tools: &Installation, prefix: &str, timeout: Duration) -> Result<Self, String> {
        let node = Self::launch(tools, prefix)?;
        node.await_startup(timeout)?;
        Ok(node)
    }

    /// Launches a node (`rabbitmq-server -detached`) without waiting for
    /// it to run: see [`LocalNode::await_startup`].
    pub fn launch(tools: &Installation, prefix: &str) -> Result<Self, String> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let short = format!("{prefix}-{}", &unique[..8]);
        let port = free_port()?;
        let dir = std::env::temp_dir().join(&short);
        std::fs::create_dir(&dir).map_err(|e| {
            format!(
                "cannot create the private RabbitMQ node's directory {}: {e}",
                dir.display()
            )
        })?;
        let mut node = Self {
            name: format!("{short}@localhost"),
            port,
            dir,
            tools: tools.clone(),
            started_epmd: false,
            launched: false,
            stopped: AtomicBool::new(false),
        };
        // Readable and writable by the broker's user, which is not ours
        // when the Debian package runs the node as user `rabbitmq`.
        set_mode(&node.dir, 0o777)?;
        let conf = node.dir.join("rabbitmq.conf");
        std::fs::write(&conf, node_config(port))
            .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        set_mode(&conf, 0o644)?;
        node.started_epmd = tools.epmd_running() == Some(false);
        let status = quiet(node.command(&tools.server).arg("-detached"))
            .status()
            .map_err(|e| format!("cannot run {}: {e}", tools.server.display()))?;
        if !status.success() {
            return Err(format!(
                "{} -detached failed ({status}){}",
                tools.server.display(),
                node.log_tail()
            ));
        }
        node.launched = true;
        Ok(node)
    }

    /// Waits until the node runs its applications (`rabbitmqctl
    /// await_startup`, asked again while the node boots), for about
    /// `timeout` at most; fails early when its VM is gone.
    pub fn await_startup(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self
                .ctl(&["await_startup", "--timeout", "5"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if self.pid().is_some_and(|pid| !alive(pid)) {
                return Err(format!(
                    "the private RabbitMQ node {} stopped while starting{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the private RabbitMQ node {} did not start within {} s{}",
                    self.name,
                    timeout.as_secs(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The node's name, `PREFIX-XXXXXXXX@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's directory (configuration, data, logs, pid file), removed
    /// when the node stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's AMQP URL (user guest, vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n NODE` for this node, with the node's environment.
    pub fn ctl_command(&self) -> Command {
        let mut cmd = self.command(&self.tools.ctl);
        cmd.arg("-n").arg(&self.name);
        cmd
    }

    /// Stops the node (`rabbitmqctl stop`, or by its VM's pid when that
    /// fails), waits until its VM is gone, removes its directory and, when
    /// the node started epmd, stops epmd (epmd refuses while other nodes
    /// are registered with it). Once; later calls do nothing.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.launched {
            self.stop_vm();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.started_epmd {
            if let Some(epmd) = &self.tools.epmd {
                // epmd may take a moment to see the node's VM gone.
                for _ in 0..10 {
                    let killed = quiet(Command::new(epmd).arg("-kill"))
                        .status()
                        .is_ok_and(|s| s.success());
                    if killed || self.tools.epmd_running() != Some(true) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Stops the node's VM and waits until it is gone.
    fn stop_vm(&self) {
        let pid_file = self.dir.join("pid");
        let stopped = self
            .ctl(&["stop"])
            .arg(&pid_file)
            .status()
            .is_ok_and(|s| s.success());
        let mut pid = self.pid();
        if !stopped {
            // Not answering (still booting, or stuck): end its VM by its
            // pid, once it has written it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while pid.is_none() && Instant::now() < deadline && self.dir.exists() {
                std::thread::sleep(Duration::from_millis(250));
                pid = self.pid();
            }
            if let Some(pid) = pid {
                let _ = quiet(Command::new("kill").args(["-9", &pid.to_string()])).status();
            }
        }
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Starts a watcher process that, once the process `pid` is gone
    /// (however it ended), stops this node, removes its directory and stops
    /// the epmd it started, unless [`LocalNode::stop`] removed the
    /// directory before. For a node kept in a static, whose drop never
    /// runs. The watcher has a process group of its own, so the signal of a
    /// Ctrl-C on the terminal does not reach it.
    pub fn stop_when_process_exits(&self, pid: u32) -> Result<(), String> {
        const WATCHER: &str = r#"
while kill -0 "$VIDU_WATCH_PID" 2>/dev/null; do sleep 1; done
[ -d "$VIDU_NODE_DIR" ] || exit 0
"$VIDU_NODE_CTL" -n "$VIDU_NODE_NAME" stop "$VIDU_NODE_DIR/pid" >/dev/null 2>&1 || {
  pid=$(cat "$VIDU_NODE_DIR/pid" 2>/dev/null)
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
}
rm -rf "$VIDU_NODE_DIR"
if [ -n "$VIDU_NODE_EPMD" ]; then
  for try in 1 2 3 4 5; do
    "$VIDU_NODE_EPMD" -kill >/dev/null 2>&1 && break
    "$VIDU_NODE_EPMD" -names >/dev/null 2>&1 || break
    sleep 1
  done
fi
exit 0
"#;
        let epmd = match (&self.tools.epmd, self.started_epmd) {
            (Some(epmd), true) => epmd.as_os_str(),
            _ => OsStr::new(""),
        };
        let mut watcher = self.command(Path::new("sh"));
        watcher
            .arg("-c")
            .arg(WATCHER)
            .env("VIDU_WATCH_PID", pid.to_string())
            .env("VIDU_NODE_DIR", &self.dir)
            .env("VIDU_NODE_CTL", &self.tools.ctl)
            .env("VIDU_NODE_NAME", &self.name)
            .env("VIDU_NODE_EPMD", epmd);
        quiet(&mut watcher)
            .spawn()
            .map(|_| ())
            .map_err(|e| format!("cannot start the watcher of {}: {e}", self.name))
    }

    /// A command with the node's environment.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(node_env(&self.name, self.port, &self.dir));
        cmd
    }

    /// `rabbitmqctl -n NODE ARGS`, its stdio discarded, in a process group
    /// of its own.
    fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.ctl_command();
        cmd.args(args);
        quiet(&mut cmd);
        cmd
    }

    /// The pid of the node's VM, from its pid file.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `; its log ends: LINE` with the last line of the node's log, or
    /// nothing.
    fn log_tail(&self) -> String {
        let last = std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
            .filter_map(|text| {
                text.lines()
                    .rev()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(str::to_owned)
            })
            .next();
        match last {
            Some(line) => {
                let line: String = line.chars().take(200).collect();
                format!("; its log ends: {line}")
            }
            None => String::new(),
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment that makes `rabbitmq-server` and `rabbitmqctl` address
/// a private node: its name, AMQP port, and its files in `dir`
/// (`rabbitmq.conf`, the optional `advanced.config`, data, logs, pid file,
/// plugins list). Every private node of the project, the demo's and the
/// tests' and the benchmark's, is run with it.
pub fn node_env(name: &str, port: u16, dir: &Path) -> [(&'static str, PathBuf); 8] {
    let d = |s: &str| dir.join(s);
    [
        ("RABBITMQ_NODENAME", PathBuf::from(name)),
        ("RABBITMQ_NODE_PORT", PathBuf::from(port.to_string())),
        ("RABBITMQ_CONFIG_FILE", d("rabbitmq")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config")),
        ("RABBITMQ_MNESIA_BASE", d("mnesia")),
        ("RABBITMQ_LOG_BASE", d("log")),
        ("RABBITMQ_PID_FILE", d("pid")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
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

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))
}

#[cfg(not(unix))]
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
        assert_eq!(env[0], ("RABBITMQ_NODENAME", PathBuf::from("n1@localhost")));
        assert_eq!(env[1], ("RABBITMQ_NODE_PORT", PathBuf::from("35672")));
        for (key, value) in &env[2..] {
            assert!(value.starts_with(dir), "{key} = {}", value.display());
        }
        assert_eq!(
            node_config(35672),
            "listeners.tcp.local = 127.0.0.1:35672\nloopback_users = none\n"
        );
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
