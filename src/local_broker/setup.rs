//! What a private node is made of on this machine: the RabbitMQ commands
//! found on the `PATH`, the user the node runs as, its private directory
//! and the files written into it, its environment and configuration, a free
//! pair of ports, and checking that a pid is the node's VM before any
//! signal goes to it.

use std::{
    ffi::{OsStr, OsString},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The RabbitMQ commands of this machine.
#[derive(Debug, Clone)]
pub struct Installation {
    pub(super) server: PathBuf,
    pub(super) ctl: PathBuf,
    pub(super) epmd: Option<PathBuf>,
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

    pub(super) fn find_in(path: &OsStr, root: bool) -> Option<Self> {
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
    pub(super) fn epmd_running(&self) -> Option<bool> {
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
pub(super) fn current_user() -> NodeUser {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(NodeUser { uid: 0, gid: 0 }, |m| NodeUser {
        uid: m.uid(),
        gid: m.gid(),
    })
}

#[cfg(not(unix))]
pub(super) fn current_user() -> NodeUser {
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
pub(super) fn alive(pid: u32) -> bool {
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
pub(super) fn quiet(cmd: &mut Command) -> &mut Command {
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
pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))
}

#[cfg(all(not(unix), test))]
pub(super) fn set_mode(_: &Path, _: u32) -> Result<(), String> {
    Ok(())
}

#[cfg(unix)]
pub(super) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
pub(super) fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// Whether this process runs as root (the owner of its `/proc` entry).
#[cfg(unix)]
pub(super) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(not(unix))]
pub(super) fn is_root() -> bool {
    false
}
