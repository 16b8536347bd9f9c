//! `nixpfs serve`: binds the HTTP cache on the configured TCP port and the
//! admin API on the data directory's Unix socket, keeps anchors synced in
//! the background, and shuts down cleanly on SIGINT/SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anchor_registry::CacheInfo;
use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Config;
use crate::http::admin::AdminSocket;
use crate::http::cache::{self, AppState};
use crate::http::ipns;
use crate::http::page;
use crate::http::routing::{self, RoutingState};
use crate::http::trustless;
use crate::http::upload::{self, Uploads};

/// Files older versions kept in the data directory: the admin token and
/// the announcement of the TCP port it was sent to. Removed at start so an
/// old CLI finds no address to send a token to.
const LEGACY_FILES: [&str; 2] = ["api.json", "admin.token"];

/// Opens `data_dir` and serves until a shutdown signal arrives. The admin
/// socket is bound first, so a second gateway on the same directory stops
/// with a one-line reason before it touches the index.
pub async fn serve(data_dir: &Path, config: Config) -> Result<()> {
    crate::util::time::check_clock()?;
    let admin_socket = AdminSocket::bind(data_dir)?;
    for legacy in LEGACY_FILES {
        let _ = std::fs::remove_file(data_dir.join(legacy));
    }
    let limits = config.http_limits()?;
    let app = App::open(data_dir, config).await?;
    let listener = tokio::net::TcpListener::bind(app.config.listen)
        .await
        .with_context(|| format!("while binding {}", app.config.listen))?;
    let local = listener.local_addr()?;

    let cache_info = CacheInfo {
        store_dir: anchor_registry::STORE_DIR.to_owned(),
        want_mass_query: app.config.want_mass_query,
        priority: Some(app.config.priority),
    }
    .to_string();
    let state = Arc::new(AppState {
        catalog: app.catalog.clone(),
        index: app.index.clone(),
        node: app.node.clone(),
        metrics: app.metrics.clone(),
        cache_info,
        seed_fetched: app.config.seed_fetched,
        prefer_peers: app.config.prefer_peers,
        upstreams: app.upstreams.clone(),
        prefetch: match app.config.upstream_prefetch_max()? {
            0 => None,
            max => Some(Arc::new(crate::http::prefetch::Prefetch::new(max))),
        },
        retention: app.config.cache_max_size()?.map(|budget| {
            Arc::new(crate::publish::retention::Retention::new(
                app.node.clone(),
                app.index.clone(),
                budget,
                app.metrics.clone(),
            ))
        }),
    });
    // Other gateways may ask what upstreams served us (bytes they then
    // fetch over IPFS, checked against the upstream's signature).
    app.node
        .serve_exchange(crate::trust::upstream::responder(app.index.clone()));
    let uploads = Uploads::configured(
        app.node.clone(),
        app.catalog.clone(),
        app.metrics.clone(),
        app.config.upload_token_file.as_deref(),
        &app.config.upload_require_sig,
    )?;
    // No admin routes here: they are on the socket only, so nothing that
    // authorises them ever travels over TCP.
    let router = cache::router(state)
        .merge(page::router(Arc::new(app.clone())))
        .merge(trustless::router(app.node.clone()))
        .merge(routing::router(Arc::new(RoutingState::new(
            app.node.clone(),
            local,
            app.metrics.clone(),
        ))))
        .merge(ipns::router(Arc::new(ipns::IpnsState {
            index: app.index.clone(),
            node: app.node.clone(),
            metrics: app.metrics.clone(),
        })))
        .merge(upload::router(uploads))
        .layer(tower_http::trace::TraceLayer::new_for_http());

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let admin =
        tokio::spawn(admin_socket.serve(Arc::new(app.clone()), shutdown.clone().cancelled_owned()));
    let syncing = spawn_sync_loop(&app);
    let republishing = spawn_republish_loop(&app);
    tracing::info!(
        "serving http://{local} (gateway key {}, IPFS peer {})",
        app.key.public(),
        app.node.peer_id()
    );
    println!("nixpfs serving on http://{local}");
    println!("add to nix.conf (or run `nixpfs nix-config`):");
    println!("  extra-substituters = http://{local}");
    println!("  extra-trusted-public-keys = {}", app.key.public());
    crate::http::server::serve(
        listener,
        router,
        limits,
        app.metrics.clone(),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    let admin_served = admin.await;
    if let Some(task) = syncing {
        task.abort();
    }
    republishing.abort();
    app.node.shutdown().await;
    // Records of fetched NARs and upstream narinfos commit without an
    // fsync; one durable commit keeps them across this restart.
    let index = app.index.clone();
    match tokio::task::spawn_blocking(move || index.sync()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot sync the index at shutdown: {e}"),
        Err(e) => tracing::warn!("cannot sync the index at shutdown: {e}"),
    }
    admin_served
        .context("the admin socket's server failed")?
        .context("while serving the admin socket")
}

fn spawn_sync_loop(app: &App) -> Option<tokio::task::JoinHandle<()>> {
    app.config.registry.as_ref()?;
    let interval = app.config.sync_interval_secs;
    let app = app.clone();
    Some(tokio::spawn(async move {
        loop {
            match app.sync().await {
                Ok(report) => tracing::info!(
                    registry_version = report.registry_version,
                    anchors = report.anchors.len(),
                    "anchor sync done"
                ),
                Err(e) => tracing::warn!("anchor sync failed: {e:#}"),
            }
            if interval == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(interval)).await;
        }
    }))
}

/// How often the IPNS records this gateway published are sent out again:
/// well inside the 48 h DHT peers keep a record, and soon enough that a
/// peer that joined (or a router that restarted) learns them the same day.
const REPUBLISH_INTERVAL: Duration = Duration::from_secs(4 * 3600);
/// The first republish waits for the DHT's bootstrap and the peers.
const REPUBLISH_FIRST: Duration = Duration::from_secs(10);

fn spawn_republish_loop(app: &App) -> tokio::task::JoinHandle<()> {
    let app = app.clone();
    tokio::spawn(async move {
        tokio::time::sleep(REPUBLISH_FIRST).await;
        loop {
            match app.names().republish().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "IPNS records republished"),
                Err(e) => tracing::warn!("IPNS republish failed: {e}"),
            }
            tokio::time::sleep(REPUBLISH_INTERVAL).await;
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
