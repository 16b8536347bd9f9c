//! Admin dispatch: each [`AdminRequest`] run on the opened data directory,
//! by the subsystem that owns it. The HTTP side (auth, framing, statuses)
//! is `http::admin`; the CLI calls the same dispatch when no gateway runs.

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::App;
use crate::http::admin::{AdminError, AdminRequest, AdminService, FetchReply, IdReply, PeerReply};
use crate::publish::pin::parse_cid;
use crate::util::keys::read_secret_key;

impl App {
    /// Runs one request; the reply is JSON for both the CLI's `--json` and
    /// its text rendering.
    pub async fn execute(&self, request: AdminRequest) -> Result<Value, AdminError> {
        Ok(self.dispatch(request).await?)
    }

    async fn dispatch(&self, request: AdminRequest) -> anyhow::Result<Value> {
        let pinner = self.publisher.pinner();
        Ok(match request {
            AdminRequest::Pin { targets, closure } => json!(pinner.pin(&targets, closure).await?),
            AdminRequest::Unpin { targets } => json!(pinner.unpin(&targets).await?),
            AdminRequest::Pins => json!(pinner.pins().await?),
            AdminRequest::Add { path } => json!(pinner.add_file(&path).await?),
            AdminRequest::Fetch { cid, out } => json!(FetchReply {
                bytes: self.fetch(&cid, &out).await?
            }),
            AdminRequest::CarExport { cid, out } => {
                json!(crate::store::car::export_file(&self.node, parse_cid(&cid)?, &out).await?)
            }
            AdminRequest::CarImport { path } => {
                json!(crate::store::car::import_file(&self.node, &path).await?)
            }
            AdminRequest::Gc => json!(self.node.gc().await?),
            AdminRequest::Sync => json!(self.sync().await?),
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
            AdminRequest::Seed { anchors, max_size } => json!(
                crate::publish::seed::seed(&self.node, self.index.clone(), &anchors, max_size)
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
            } => json!(
                crate::publish::contribute(
                    &self.publisher,
                    &targets,
                    closure,
                    &key_file,
                    out,
                    expires
                )
                .await?
            ),
            AdminRequest::ImportClaims { source } => {
                json!(crate::publish::import_claims(&self.publisher, &source).await?)
            }
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
                json!(crate::publish::rebuild(&self.publisher, &targets, &options).await?)
            }
            AdminRequest::Repro => json!(crate::publish::repro(&self.publisher).await?),
            AdminRequest::Id => json!(IdReply {
                peer_id: self.node.peer_id().to_string(),
                listen_addrs: self
                    .node
                    .listen_addrs()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                gateway_key: self.key.public(),
            }),
        })
    }
}

impl AdminService for App {
    fn execute(&self, request: AdminRequest) -> BoxFuture<'_, Result<Value, AdminError>> {
        Box::pin(App::execute(self, request))
    }
}
