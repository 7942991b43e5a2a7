//! A real S3-compatible server for the tests: `s3s-fs` (an S3 server over
//! a directory) in this process, on `127.0.0.1:<random port>`, checking
//! SigV4 signatures against credentials the test can change while it runs
//! (refused credentials, then accepted), and able to go down and come back
//! on the same port (a storage outage). Objects are read back from its
//! directory. Test code: failures panic.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder as ConnBuilder,
};
use s3s::{
    auth::{S3Auth, SecretKey},
    service::S3ServiceBuilder,
    S3Result,
};
use tokio::{net::TcpListener, task::JoinSet};

/// The bucket every test server has.
pub const BUCKET: &str = "videos";
/// The credentials it accepts at start.
pub const ACCESS_KEY: &str = "AKIAVIDUWORKERTEST01";
/// The secret it accepts at start.
pub const SECRET_KEY: &str = "s3-secret-0123456789abcdefghijklmnopqrstu";

/// Credentials the server accepts, changeable while it runs.
#[derive(Clone)]
struct Accepted(Arc<RwLock<(String, String)>>);

#[async_trait::async_trait]
impl S3Auth for Accepted {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let (id, secret) = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if access_key == id {
            Ok(SecretKey::from(secret))
        } else {
            Err(s3s::s3_error!(InvalidAccessKeyId))
        }
    }
}

/// A running S3 server; stopped and its directory deleted on drop.
pub struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    accepted: Accepted,
    serving: Option<JoinSet<()>>,
}

impl S3Server {
    /// Starts a server with the bucket [`BUCKET`].
    pub async fn start() -> Self {
        let root = std::env::temp_dir().join(format!("vidu-s3-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(root.join(BUCKET)).expect("the server's directory");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut server = Self {
            addr,
            root,
            accepted: Accepted(Arc::new(RwLock::new((
                ACCESS_KEY.to_owned(),
                SECRET_KEY.to_owned(),
            )))),
            serving: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let fs = s3s_fs::FileSystem::new(&self.root).expect("s3s-fs");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(self.accepted.clone());
        let service = builder.build();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let mut connections = JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                connections.spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        self.serving = Some(tasks);
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Accepts only these credentials from now on.
    pub fn accept_only(&self, access_key: &str, secret: &str) {
        *self
            .accepted
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (access_key.to_owned(), secret.to_owned());
    }

    /// Goes down: no more connections, the open ones cut.
    pub fn stop(&mut self) {
        if let Some(mut tasks) = self.serving.take() {
            tasks.abort_all();
        }
    }

    /// Comes back on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = crate::eventually(
            std::time::Duration::from_secs(10),
            "the S3 server's port again",
            || async { TcpListener::bind(self.addr).await.ok() },
        )
        .await;
        self.serve(listener);
    }

    /// An object's bytes, read from the server's directory.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(BUCKET).join(key)).ok()
    }

    /// Every object key in the bucket (files under its directory).
    pub fn keys(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        let bucket = self.root.join(BUCKET);
        walk(&bucket, &bucket, &mut out);
        out.retain(|k| !k.starts_with(".s3s") && !k.contains(".vidu-worker-check"));
        out.sort();
        out
    }

    /// Parts of multipart uploads neither completed nor aborted.
    pub fn upload_leftovers(&self) -> usize {
        std::fs::read_dir(&self.root).map_or(0, |entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
                .count()
        })
    }

    /// The worker environment for this server: the storage settings and
    /// the credentials it accepts at start (as `AWS_*` variables).
    pub fn worker_env(&self) -> Vec<(String, String)> {
        vec![
            ("VIDU_WORKER__STORAGE__BUCKET".into(), BUCKET.into()),
            ("VIDU_WORKER__STORAGE__ENDPOINT".into(), self.endpoint()),
            ("VIDU_WORKER__STORAGE__PATH_STYLE".into(), "true".into()),
            (
                "VIDU_WORKER__STORAGE__ALLOW_PRIVATE_SOURCES".into(),
                "true".into(),
            ),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
