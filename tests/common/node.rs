//! A private RabbitMQ node for tests that stop and start the broker, so they
//! cannot disturb tests running in parallel against the shared broker.
//! Started with the machine's `rabbitmq-server` on free ports, with its own
//! data directory; stopped and removed on drop.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

pub struct BrokerNode {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl BrokerNode {
    /// Starts a node and waits until it accepts connections.
    pub fn start() -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("vidutest{}@localhost", &unique[..8]);
        let port = free_port();
        let mut dist = free_port();
        while dist == port {
            dist = free_port();
        }
        let dir = std::env::temp_dir().join(format!("vidu-broker-{}", &unique[..8]));
        std::fs::create_dir_all(&dir).expect("node dir");
        set_mode(&dir, 0o777);
        let conf = dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("node config");
        set_mode(&conf, 0o644);
        let node = Self { name, port, dir };
        let status = node
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .expect("rabbitmq-server is installed");
        assert!(status.success(), "rabbitmq-server -detached failed");
        node.await_startup();
        node
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let d = |s: &str| self.dir.join(s).to_string_lossy().into_owned();
        cmd.env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn ctl(&self, args: &[&str]) -> bool {
        self.command("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Waits (up to two minutes) until the node runs its applications.
    pub fn await_startup(&self) {
        for _ in 0..60 {
            if self.ctl(&["await_startup", "--timeout", "5"]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("private broker {} did not start", self.name);
    }

    /// The AMQP URL of this node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl stop_app`: the broker goes away, the node stays.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "stop_app");
    }

    /// `rabbitmqctl start_app`, then waits for it.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "start_app");
        self.await_startup();
    }

    /// Runs `rabbitmqctl` with arbitrary arguments against this node.
    pub fn rabbitmqctl(&self, args: &[&str]) -> bool {
        self.ctl(args)
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
