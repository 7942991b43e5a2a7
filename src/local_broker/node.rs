//! One private RabbitMQ node: the machine's `rabbitmq-server` as a node of
//! this process's own (a unique name, a free AMQP port whose Erlang
//! distribution port is free too, a new private directory for its
//! configuration, data and logs), with the options the demo, the tests and
//! the benchmark need (a TLS listener with given certificates, Erlang
//! `advanced.config` terms), and what they do to it: `rabbitmqctl`, users,
//! permissions and definitions as an operator would, a hard kill and a
//! restart, and a stop that leaves nothing running. Every call blocks
//! (async callers use `spawn_blocking` or `block_in_place`); errors are one
//! line.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        PoisonError,
    },
    time::{Duration, Instant},
};

use super::setup::{
    alive, create_node_dir, free_port, hand_over_node_dir, node_config, node_env, quiet,
    verified_vm_pid, write_node_file, Installation, NodeUser,
};

/// A TLS listener: PEM contents, written into the node's directory.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// CA certificates the broker trusts for client certificates.
    pub ca_pem: String,
    /// The broker's certificate (chain).
    pub cert_pem: String,
    /// The broker's private key.
    pub key_pem: String,
    /// Refuse clients without a certificate signed by `ca_pem` (mutual TLS).
    pub require_client_cert: bool,
}

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// A TLS listener on a second free port.
    pub tls: Option<NodeTls>,
    /// Erlang terms for the node's `advanced.config` (without the final
    /// dot), e.g. `[{rabbit, [{key, value}]}]`.
    pub advanced_config: Option<String>,
}

/// A RabbitMQ node of this process's own, on 127.0.0.1 and a free port,
/// with its data in a temporary directory. Stopped and removed by
/// [`LocalNode::stop`] or on drop.
#[derive(Debug)]
pub struct LocalNode {
    name: String,
    port: u16,
    /// The TLS listener's port, when the node has one.
    tls_port: Option<u16>,
    dir: PathBuf,
    tools: Installation,
    /// Whether epmd did not run before this node started (so this node
    /// started it, and stopping the node stops it too).
    started_epmd: bool,
    /// Whether `rabbitmq-server -detached` succeeded (a VM may run).
    launched: bool,
    /// The node's VM, as the node itself reported it once it ran (never
    /// read from a file: see [`verified_vm_pid`]).
    vm_pid: std::sync::Mutex<Option<u32>>,
    /// The user the node runs as (its files' owner).
    owner: NodeUser,
    stopped: AtomicBool,
    /// The VM [`LocalNode::kill`] ended, whose pid the pid file still
    /// names until the node runs again.
    killed_pid: std::sync::Mutex<Option<u32>>,
}

impl LocalNode {
    /// Starts a node named `PREFIX-XXXXXXXX@localhost` and waits (up to
    /// `timeout`) until it runs; a node that does not come up is stopped
    /// and removed.
    pub fn start(tools: &Installation, prefix: &str, timeout: Duration) -> Result<Self, String> {
        Self::start_with(tools, prefix, &NodeOptions::default(), timeout)
    }

    /// [`LocalNode::start`] with options.
    pub fn start_with(
        tools: &Installation,
        prefix: &str,
        options: &NodeOptions,
        timeout: Duration,
    ) -> Result<Self, String> {
        let node = Self::launch_with(tools, prefix, options)?;
        node.await_startup(timeout)?;
        Ok(node)
    }

    /// Launches a node (`rabbitmq-server -detached`) without waiting for
    /// it to run: see [`LocalNode::await_startup`].
    pub fn launch(tools: &Installation, prefix: &str) -> Result<Self, String> {
        Self::launch_with(tools, prefix, &NodeOptions::default())
    }

    /// [`LocalNode::launch`] with options.
    pub fn launch_with(
        tools: &Installation,
        prefix: &str,
        options: &NodeOptions,
    ) -> Result<Self, String> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let short = format!("{prefix}-{}", &unique[..8]);
        let port = free_port()?;
        let tls_port = match options.tls {
            Some(_) => Some(
                std::iter::repeat_with(free_port)
                    .take(20)
                    .find(|p| p.as_ref().is_ok_and(|p| *p != port))
                    .unwrap_or_else(|| Err("no second free port for the TLS listener".into()))?,
            ),
            None => None,
        };
        let dir = std::env::temp_dir().join(&short);
        let owner = NodeUser::of(tools)?;
        // The configuration first, while the directory is still ours alone;
        // then the directory goes to the node's user.
        create_node_dir(&dir)?;
        let mut node = Self {
            name: format!("{short}@localhost"),
            port,
            tls_port,
            dir,
            tools: tools.clone(),
            started_epmd: false,
            launched: false,
            vm_pid: std::sync::Mutex::new(None),
            owner,
            stopped: AtomicBool::new(false),
            killed_pid: std::sync::Mutex::new(None),
        };
        let mut conf = node_config(port);
        if let (Some(tls), Some(tls_port)) = (&options.tls, tls_port) {
            let file = |name: &str, pem: &str| {
                let path = node.dir.join(name);
                write_node_file(&path, pem).map(|()| path.to_string_lossy().into_owned())
            };
            conf.push_str(&format!(
                "listeners.ssl.local = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = {}\n",
                file("ca.pem", &tls.ca_pem)?,
                file("server.pem", &tls.cert_pem)?,
                file("server.key", &tls.key_pem)?,
                tls.require_client_cert,
            ));
        }
        if let Some(terms) = &options.advanced_config {
            write_node_file(&node.dir.join("advanced.config"), &format!("{terms}.\n"))?;
        }
        write_node_file(&node.dir.join("rabbitmq.conf"), &conf)?;
        hand_over_node_dir(&node.dir, owner)?;
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
                let pid = self.pid_from_node()?;
                *self.vm_pid.lock().unwrap_or_else(PoisonError::into_inner) = Some(pid);
                return Ok(());
            }
            // A pid file left by a killed VM says nothing about this start.
            let killed = *self
                .killed_pid
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if self
                .pid()
                .filter(|pid| Some(*pid) != killed)
                .is_some_and(|pid| !alive(pid))
            {
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

    /// Asks the running node for its VM's pid, and checks it.
    fn pid_from_node(&self) -> Result<u32, String> {
        let mut cmd = self.ctl_command();
        cmd.args(["eval", "os:getpid()."])
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| format!("cannot ask {} for its pid: {e}", self.name))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let pid: i64 = text
            .trim()
            .trim_matches('"')
            .parse()
            .map_err(|_| format!("{} did not say its pid", self.name))?;
        verified_vm_pid(pid, &self.name, self.owner)
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

    /// An AMQP URL with other credentials and an already percent-encoded
    /// vhost.
    pub fn url_for(&self, user: &str, password: &str, vhost: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/{vhost}", self.port)
    }

    /// The TLS listener's port, when the node has one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// An amqps:// URL of the TLS listener, reached by `host`.
    pub fn tls_url(&self, host: &str) -> Option<String> {
        self.tls_port
            .map(|port| format!("amqps://guest:guest@{host}:{port}/%2f"))
    }

    /// Runs `rabbitmqctl -n NODE ARGS` and returns what it printed, or one
    /// line naming the command and what it said when it failed.
    pub fn ctl_output(&self, args: &[&str]) -> Result<String, String> {
        let what = args.first().copied().unwrap_or_default();
        let mut cmd = self.ctl_command();
        cmd.args(args).stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl {what}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rabbitmqctl {what} on {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rabbitmqctl stop_app`: the broker goes away, the node stays.
    pub fn stop_app(&self) -> Result<(), String> {
        self.ctl_output(&["stop_app"]).map(drop)
    }

    /// `rabbitmqctl start_app`, then waits (up to `timeout`) for it.
    pub fn start_app(&self, timeout: Duration) -> Result<(), String> {
        self.ctl_output(&["start_app"])?;
        self.await_startup(timeout)
    }

    /// Adds a user with no permissions anywhere.
    pub fn add_user(&self, user: &str, password: &str) -> Result<(), String> {
        self.ctl_output(&["add_user", user, password]).map(drop)
    }

    /// `rabbitmqctl set_permissions -p VHOST USER CONFIGURE WRITE READ`.
    pub fn set_permissions(&self, vhost: &str, user: &str, perms: [&str; 3]) -> Result<(), String> {
        self.ctl_output(&[
            "set_permissions",
            "-p",
            vhost,
            user,
            perms[0],
            perms[1],
            perms[2],
        ])
        .map(drop)
    }

    /// `rabbitmqctl import_definitions FILE`, as an operator would.
    pub fn import_definitions(&self, file: &Path) -> Result<(), String> {
        let path = file.to_string_lossy().into_owned();
        self.ctl_output(&["import_definitions", &path]).map(drop)
    }

    /// Imports definitions given as JSON (vhosts, users with a `password`,
    /// permissions, ...) in one call, much quicker than one `rabbitmqctl`
    /// call per user. The file is written new into the node's directory
    /// and removed afterwards.
    pub fn import_definitions_json(&self, definitions: &serde_json::Value) -> Result<(), String> {
        let path = self.dir.join(format!(
            "definitions-{}.json",
            uuid::Uuid::new_v4().simple()
        ));
        write_node_file(&path, &definitions.to_string())?;
        let imported = self.import_definitions(&path);
        let _ = std::fs::remove_file(&path);
        imported
    }

    /// Stops the node hard, as a crashed machine would: SIGKILL to its VM
    /// (the one the node reported), no clean shutdown, no goodbye to its
    /// cluster. Returns once its AMQP port is closed.
    pub fn kill(&self) -> Result<(), String> {
        let pid = self
            .vm_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| format!("{} has no running VM to kill", self.name))?;
        // Checked again: the VM the node reported may have ended since.
        let pid = verified_vm_pid(i64::from(pid), &self.name, self.owner)?;
        quiet(Command::new("kill").args(["-9", &pid.to_string()]))
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        *self
            .killed_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(pid);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..100 {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("{} still answers after SIGKILL", self.name))
    }

    /// Starts a killed node again (it rejoins its cluster) and waits (up to
    /// `timeout`) until it runs.
    pub fn restart(&self, timeout: Duration) -> Result<(), String> {
        let status = quiet(self.command(&self.tools.server).arg("-detached"))
            .status()
            .map_err(|e| format!("cannot run {}: {e}", self.tools.server.display()))?;
        if !status.success() {
            return Err(format!(
                "{} -detached failed ({status}){}",
                self.tools.server.display(),
                self.log_tail()
            ));
        }
        self.await_startup(timeout)
    }

    /// The pid of the node's VM, as the node reported it, while it runs.
    pub fn vm_pid(&self) -> Option<u32> {
        *self.vm_pid.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Stops the node's VM and waits until it is gone: `rabbitmqctl stop`,
    /// or a SIGKILL to its VM when that fails. The VM's pid is the one the
    /// node reported, or else the pid file's once [`verified_vm_pid`]
    /// accepts it; no other process is ever signalled.
    fn stop_vm(&self) {
        let stopped = self.ctl(&["stop"]).status().is_ok_and(|s| s.success());
        let known = *self.vm_pid.lock().unwrap_or_else(PoisonError::into_inner);
        let mut pid = known.or_else(|| self.checked_pid_file());
        if !stopped {
            // Not answering (still booting, or stuck): end its VM by its
            // pid, once it is known.
            let deadline = Instant::now() + Duration::from_secs(30);
            while pid.is_none() && Instant::now() < deadline && self.dir.exists() {
                std::thread::sleep(Duration::from_millis(250));
                pid = self.checked_pid_file();
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

    /// The pid file's pid, if it is this node's VM.
    fn checked_pid_file(&self) -> Option<u32> {
        let pid = i64::from(self.pid()?);
        verified_vm_pid(pid, &self.name, self.owner).ok()
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
"$VIDU_NODE_CTL" -n "$VIDU_NODE_NAME" stop >/dev/null 2>&1 || {
  # Only the VM the node reported at start, and only while it still is
  # that node's VM: an Erlang VM of the node's user naming the node.
  pid="$VIDU_NODE_PID"
  case "$pid" in ''|*[!0-9]*) pid=0 ;; esac
  if [ "$pid" -gt 1 ] \
     && [ "$(stat -c %u "/proc/$pid" 2>/dev/null)" = "$VIDU_NODE_UID" ] \
     && tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -n 1 | grep -q beam \
     && tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$VIDU_NODE_NAME"; then
    kill -9 "$pid" 2>/dev/null
  fi
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
            .env(
                "VIDU_NODE_PID",
                self.vm_pid
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .map_or_else(String::new, |p| p.to_string()),
            )
            .env("VIDU_NODE_UID", self.owner.uid.to_string())
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
