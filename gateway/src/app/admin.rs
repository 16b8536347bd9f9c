//! Admin dispatch: each [`AdminRequest`] run on the opened data directory,
//! by the subsystem that owns it. The HTTP side (auth, framing, statuses)
//! is `http::admin`; the CLI calls the same dispatch when no gateway runs.

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::App;
use crate::http::admin::{
    AdminError, AdminRequest, AdminService, FetchReply, IdReply, NameReply, PeerReply,
    ProviderReply,
};
use crate::http::page::{PageSource, PageView};
use crate::publish::pin::parse_cid;
use crate::store::ipfs::ipns::IpnsName;
use crate::util::keys::read_secret_key;
use crate::util::progress::Meter;

/// How long `routing findprovs` looks (Kubo's default is about a minute).
const FIND_PROVIDERS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl App {
    /// Runs one request; the reply is JSON for both the CLI's `--json` and
    /// its text rendering.
    pub async fn execute(&self, request: AdminRequest) -> Result<Value, AdminError> {
        self.execute_counted(request, &Meter::new()).await
    }

    /// [`App::execute`], long operations counting their progress into `meter`.
    pub async fn execute_counted(
        &self,
        request: AdminRequest,
        meter: &Meter,
    ) -> Result<Value, AdminError> {
        // Claims and rebuild records feed the reproducibility counts that
        // `status` reads stored (sync refreshes them itself).
        let changes_repro = matches!(
            request,
            AdminRequest::Contribute { .. }
                | AdminRequest::ImportClaims { .. }
                | AdminRequest::AnchorRebuild { .. }
        );
        let reply = self.dispatch(request, meter).await?;
        if changes_repro {
            crate::publish::refresh_repro_counts(&self.publisher).await?;
        }
        Ok(reply)
    }

    async fn dispatch(&self, request: AdminRequest, meter: &Meter) -> anyhow::Result<Value> {
        let publisher = self.publisher.with_meter(meter);
        let pinner = publisher.pinner();
        Ok(match request {
            AdminRequest::Pin { targets, closure } => json!(pinner.pin(&targets, closure).await?),
            AdminRequest::Unpin { targets } => json!(pinner.unpin(&targets).await?),
            AdminRequest::Pins => json!(pinner.pins().await?),
            AdminRequest::Add { path } => json!(pinner.add_file(&path).await?),
            AdminRequest::Fetch { cid, out } => json!(FetchReply {
                bytes: self.fetch(&cid, &out, meter).await?
            }),
            AdminRequest::CarExport { cid, out } => {
                json!(
                    crate::store::car::export_file(&self.node, parse_cid(&cid)?, &out, meter)
                        .await?
                )
            }
            AdminRequest::CarImport { path } => {
                json!(crate::store::car::import_file(&self.node, &path, meter).await?)
            }
            AdminRequest::Gc => json!(self.gc().await?),
            AdminRequest::RepoVerify => json!(
                crate::store::repo_verify::verify_repo(&self.node, self.index.clone(), meter)
                    .await?
            ),
            AdminRequest::Sync => json!(self.sync_counted(meter).await?),
            AdminRequest::Status => json!(self.status().await?),
            AdminRequest::Conflicts => json!(self.conflicts().await?),
            AdminRequest::Peers => {
                let peers = self.node.connected_peers().await?;
                json!(peers
                    .into_iter()
                    .map(|p| PeerReply {
                        peer_id: p.peer_id.to_string(),
                        agent_version: p.agent_version,
                    })
                    .collect::<Vec<_>>())
            }
            AdminRequest::FindProviders { cid, limit } => {
                let found = self
                    .node
                    .find_providers(parse_cid(&cid)?, limit, FIND_PROVIDERS_TIMEOUT)
                    .await?;
                json!(found
                    .into_iter()
                    .map(|p| ProviderReply {
                        peer_id: p.peer.to_string(),
                        addrs: p.addrs.iter().map(ToString::to_string).collect(),
                    })
                    .collect::<Vec<_>>())
            }
            AdminRequest::Provide { cid } => {
                let cid = parse_cid(&cid)?;
                self.node.provide(cid).await?;
                json!({ "provided": cid.to_string() })
            }
            AdminRequest::Seed { anchors, max_size } => json!(
                crate::publish::seed::seed(
                    &self.node,
                    self.index.clone(),
                    &self.metrics,
                    &anchors,
                    max_size,
                    meter
                )
                .await?
            ),
            AdminRequest::AnchorSign {
                targets,
                closure,
                key_file,
            } => json!(
                crate::publish::anchor::sign(
                    pinner,
                    &self.data_dir,
                    &targets,
                    closure,
                    &read_secret_key(&key_file)?
                )
                .await?
            ),
            AdminRequest::Contribute {
                targets,
                closure,
                key_file,
                out,
                expires,
                ipns,
            } => {
                let mut contribution = crate::publish::contribute(
                    &publisher, &targets, closure, &key_file, out, expires,
                )
                .await?;
                if ipns {
                    contribution.ipns = Some(
                        crate::publish::names::publish_set(
                            pinner,
                            &self.names(),
                            &read_secret_key(&key_file)?,
                            &contribution.out,
                        )
                        .await?,
                    );
                }
                json!(contribution)
            }
            AdminRequest::NamePublish { key_file, set_file } => json!(
                crate::publish::names::publish_set(
                    pinner,
                    &self.names(),
                    &read_secret_key(&key_file)?,
                    &set_file
                )
                .await?
            ),
            AdminRequest::NameResolve { name } => {
                let name: IpnsName = name.parse()?;
                let resolved = self.names().resolve(&name).await?;
                json!(NameReply {
                    name: name.to_string(),
                    value: format!("/ipfs/{}", resolved.value),
                    sequence: resolved.sequence,
                    validity: resolved.validity,
                })
            }
            AdminRequest::ImportClaims { source } => match source.strip_prefix("ipns://") {
                Some(name) => {
                    let name: IpnsName = name.parse()?;
                    let resolved = self.names().resolve(&name).await?;
                    json!(
                        crate::publish::import_named_claims(
                            &self.publisher,
                            &format!("ipfs://{}", resolved.value),
                            &name
                        )
                        .await?
                    )
                }
                None => json!(crate::publish::import_claims(&self.publisher, &source).await?),
            },
            AdminRequest::Claims => json!(crate::publish::list(&self.publisher).await?),
            AdminRequest::AnchorRebuild {
                targets,
                key_file,
                only_if_matches,
            } => {
                let options = crate::publish::RebuildOptions {
                    key: read_secret_key(&key_file)?,
                    only_if_matches,
                };
                json!(crate::publish::rebuild(&publisher, &targets, &options).await?)
            }
            AdminRequest::Repro => json!(crate::publish::repro(&self.publisher).await?),
            AdminRequest::Id => json!(IdReply {
                peer_id: self.node.peer_id().to_string(),
                listen_addrs: self.listen_addrs(),
                gateway_key: self.key.public(),
            }),
        })
    }
}

impl PageSource for App {
    fn view(&self) -> BoxFuture<'_, anyhow::Result<PageView>> {
        Box::pin(async move {
            let status = self.status().await?;
            let pins = self.publisher.pinner().pins().await?;
            let peers = self
                .node
                .connected_peers()
                .await?
                .into_iter()
                .map(|p| PeerReply {
                    peer_id: p.peer_id.to_string(),
                    agent_version: p.agent_version,
                })
                .collect();
            let registry = self.catalog.trust().and_then(|t| t.registry);
            let root_keys = match (registry, &self.trust_root) {
                (Some(registry), _) => registry
                    .root_keys()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                (None, Some(root)) => root.keys().iter().map(ToString::to_string).collect(),
                (None, None) => Vec::new(),
            };
            Ok(PageView {
                status,
                gateway_key: self.key.public().to_string(),
                substituter: format!("http://{}", self.config.listen),
                root_keys,
                pins,
                peers,
                conflicts: self.conflicts().await?,
            })
        })
    }
}

impl AdminService for App {
    fn execute(
        &self,
        request: AdminRequest,
        meter: Meter,
    ) -> BoxFuture<'_, Result<Value, AdminError>> {
        Box::pin(async move { self.execute_counted(request, &meter).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::http::admin::ErrorKind;
    use crate::publish::pin::PinEntry;

    async fn open(dir: &std::path::Path) -> App {
        let config = Config {
            ipfs_listen: vec!["/ip4/127.0.0.1/tcp/0".to_owned()],
            ..Config::default()
        };
        App::open(dir, config)
            .await
            .expect("open the data directory")
    }

    #[tokio::test]
    async fn dispatch_runs_each_op_on_its_subsystem_and_types_its_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = open(&dir.path().join("data")).await;
        assert_eq!(
            app.execute(AdminRequest::Pins).await.expect("pins"),
            json!([])
        );

        let file = dir.path().join("hello.txt");
        std::fs::write(&file, b"hello from a unit test").expect("write");
        let added: PinEntry = serde_json::from_value(
            app.execute(AdminRequest::Add { path: file })
                .await
                .expect("add"),
        )
        .expect("a pin entry");
        let pins: Vec<PinEntry> =
            serde_json::from_value(app.execute(AdminRequest::Pins).await.expect("pins"))
                .expect("pin entries");
        assert_eq!(pins, vec![added.clone()]);

        let kind = |request| async { app.execute(request).await.expect_err("must fail").kind };
        let unknown_path = "/nix/store/00000000000000000000000000000000-never-pinned";
        assert_eq!(
            kind(AdminRequest::Unpin {
                targets: vec![unknown_path.to_owned()]
            })
            .await,
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(AdminRequest::Fetch {
                cid: "not-a-cid".to_owned(),
                out: dir.path().join("out")
            })
            .await,
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(AdminRequest::Add {
                path: dir.path().join("missing")
            })
            .await,
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(AdminRequest::Sync).await,
            ErrorKind::BadRequest,
            "no registry configured"
        );

        let unpinned = app
            .execute(AdminRequest::Unpin {
                targets: vec![added.cid.clone()],
            })
            .await
            .expect("unpin the CID");
        assert_eq!(unpinned, json!([added.cid]));
        assert_eq!(
            app.execute(AdminRequest::Pins).await.expect("pins"),
            json!([])
        );
        app.shutdown().await;
    }

    #[tokio::test]
    async fn status_reads_stored_repro_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let app = open(&data).await;
        let status = app.status().await.expect("status");
        assert_eq!(status.repro, crate::publish::ReproCounts::default());
        let stored = data.join("repro-counts.json");
        assert!(stored.is_file(), "the first status stores the counts");
        // A stored count is what status reports, until something refreshes it.
        let counts = crate::publish::ReproCounts {
            reproduced: 7,
            ..Default::default()
        };
        std::fs::write(&stored, serde_json::to_vec(&counts).expect("json")).expect("write");
        assert_eq!(app.status().await.expect("status").repro.reproduced, 7);
        app.shutdown().await;
    }
}
