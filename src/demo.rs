//! The demo NATS service of the quick start: answers every request on its subject with the
//! request's own payload and headers (an echo), and logs who called: the gateway's
//! `Ipc-Gateway-Identity` header, which it does not echo (it is for the service, not the
//! client).

use futures_util::StreamExt;
use tracing::info;

/// Serves `subject` on the NATS server at `url` until the connection ends.
pub async fn echo(url: &str, subject: &str) -> Result<(), async_nats::Error> {
    let client = async_nats::ConnectOptions::new()
        .name("ipc-gateway-demo-echo")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await?;
    let mut requests = client.subscribe(subject.to_owned()).await?;
    client.flush().await.ok();
    info!(subject, url, "demo echo service is answering");
    while let Some(message) = requests.next().await {
        if let Some(reply) = message.reply {
            let headers = message.headers.map(|headers| {
                if let Some(caller) = headers.get("Ipc-Gateway-Identity") {
                    info!(caller = caller.as_str(), "echo");
                }
                headers
                    .iter()
                    .filter(|(name, _)| !is_gateway_header(name.as_ref()))
                    .flat_map(|(name, values)| {
                        values.iter().map(move |v| (name.clone(), v.clone()))
                    })
                    .collect::<async_nats::HeaderMap>()
            });
            let sent = match headers.filter(|headers| !headers.is_empty()) {
                Some(headers) => {
                    client
                        .publish_with_headers(reply, headers, message.payload)
                        .await
                }
                None => client.publish(reply, message.payload).await,
            };
            sent?;
        }
    }
    Ok(())
}

fn is_gateway_header(name: &str) -> bool {
    crate::protocol::identity::is_reserved_header(name)
}
