//! A real nginx on loopback serving a directory as a static Nix binary
//! cache (what `nix copy --to file://…` writes), for the upstream-bridge
//! tests: started on a free port, stopped (by its own pid) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::free_port;

/// One running nginx.
#[derive(Debug)]
pub struct Nginx {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// The nginx binary: on PATH, else Debian's /usr/sbin/nginx.
fn nginx_bin() -> PathBuf {
    let sbin = Path::new("/usr/sbin/nginx");
    if sbin.is_file() {
        sbin.to_owned()
    } else {
        crate::require_tool("nginx");
        PathBuf::from("nginx")
    }
}

impl Nginx {
    /// Serves `root` on 127.0.0.1; its config, pid and logs live in `dir`.
    pub fn start(root: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let port = free_port();
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n  sendfile on;\n  tcp_nodelay on;\n\
                 default_type application/octet-stream;\n\
                 types {{ text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }}\n\
                 client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
                 uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
                 server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
                root.display()
            ),
        )
        .expect("nginx.conf");
        let child = Command::new(nginx_bin())
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Self {
            port,
            dir: dir.to_owned(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = nginx.child.as_mut().map(Child::try_wait) {
                panic!("nginx exited ({status}):\n{}", nginx.error_log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// `http://127.0.0.1:PORT/<sub>` (no trailing slash).
    pub fn url(&self, sub: &str) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, sub.trim_matches('/'))
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// nginx's access log so far (one line per request).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Stops nginx (fast shutdown) and waits until the port is closed.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
