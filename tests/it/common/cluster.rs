//! A 3-node nats-server cluster for the scale-out tests: routes between the nodes, JetStream on
//! each with its own temporary store directory, every port free and on loopback. A node can be
//! killed with -9 and started again on the same ports and store, as a crash and a restart would.

use std::time::{Duration, Instant};

use super::{NatsServer, PATIENCE, free_port, http_get};

/// The nodes of one cluster; every node is killed when the cluster is dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    _store: tempfile::TempDir,
}

impl NatsCluster {
    /// Three nodes, each routed to the other two, with JetStream; returns once every node
    /// reports JetStream healthy (a meta leader is elected), so streams and KV buckets can be
    /// made at once.
    pub async fn start() -> NatsCluster {
        NatsCluster::start_nodes(3).await
    }

    pub async fn start_nodes(count: usize) -> NatsCluster {
        let store = tempfile::tempdir().expect("JetStream store directory");
        let route_ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let nodes = (0..count)
            .map(|index| {
                let routes: Vec<String> = route_ports
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, port)| format!("\"nats-route://127.0.0.1:{port}\""))
                    .collect();
                let config = format!(
                    "server_name: n{index}\n\
                     jetstream {{ store_dir: \"{store}/n{index}\" }}\n\
                     cluster {{\n  name: gwtest\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
                    store = store.path().display(),
                    route = route_ports[index],
                    routes = routes.join(", "),
                );
                NatsServer::start_with_config(&config)
            })
            .collect();
        let cluster = NatsCluster {
            nodes,
            _store: store,
        };
        cluster.wait_healthy().await;
        cluster
    }

    /// Every node's client URL, comma separated: what `--nats-url` takes for a cluster.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node answers `/healthz` with 200 (JetStream current).
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in self.nodes.iter().filter(|node| node.is_running()) {
            loop {
                let (status, body) = http_get(node.monitor_port, "/healthz").await;
                if status == 200 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node on port {} is not healthy: {status} {body}",
                    node.port
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// How many routes `node` has to the others, from its monitoring port.
    pub async fn routes_of(&self, node: usize) -> usize {
        let (_, body) = http_get(self.nodes[node].monitor_port, "/routez").await;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value["num_routes"].as_u64())
            .unwrap_or(0) as usize
    }

    /// Waits until every running node has a route to every other running node.
    pub async fn wait_routed(&self) {
        let running = self.nodes.iter().filter(|node| node.is_running()).count();
        let deadline = Instant::now() + PATIENCE * 3;
        for index in 0..self.nodes.len() {
            if !self.nodes[index].is_running() {
                continue;
            }
            // nats-server may open more than one route per peer (route pooling): at least one each.
            while self.routes_of(index).await < running - 1 {
                assert!(Instant::now() < deadline, "node {index} is not routed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
