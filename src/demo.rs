//! The demo NATS service of the quick start: answers every request on its subject with the
//! request's own payload and headers (an echo), and logs who called: the gateway's
//! `Ipc-Gateway-Identity` header, which it does not echo (it is for the service, not the
//! client). It can also make the quick start's JetStream stream, so that durable publishes
//! and replays have a stream to use.

use futures_util::StreamExt;
use tracing::info;

/// Serves `subject` on the NATS server at `url` until the connection ends; first makes the
/// stream `(name, subject)` when given and missing. `options` carry the credentials and TLS.
pub async fn echo(
    options: async_nats::ConnectOptions,
    url: &str,
    subject: &str,
    stream: Option<(&str, &str)>,
) -> Result<(), async_nats::Error> {
    let client = options
        .name("ipc-gateway-demo-echo")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await?;
    if let Some((name, subjects)) = stream {
        let jetstream = async_nats::jetstream::new(client.clone());
        let made = jetstream
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                max_messages: 10_000,
                ..Default::default()
            })
            .await;
        // The echo is the demo's main job: without JetStream it still answers.
        match made {
            Ok(_) => info!(stream = name, subjects, "demo stream is ready"),
            Err(err) => tracing::warn!(
                stream = name,
                subjects,
                "no demo stream: {err} (does NATS run with JetStream, -js?)"
            ),
        }
    }
    let mut requests = client.subscribe(subject.to_owned()).await?;
    client.flush().await.ok();
    info!(subject, url, "demo echo service is answering");
    while let Some(message) = requests.next().await {
        if let Some(reply) = message.reply {
            let headers = message.headers.and_then(|headers| {
                if tracing::enabled!(tracing::Level::INFO)
                    && let Some(caller) = headers.get("Ipc-Gateway-Identity")
                {
                    info!(caller = caller.as_str(), "echo");
                }
                // Most requests carry only the gateway's headers: nothing to copy.
                let client_headers = headers
                    .iter()
                    .filter(|(name, _)| !is_gateway_header(name.as_ref()));
                client_headers.clone().next()?;
                Some(
                    client_headers
                        .flat_map(|(name, values)| {
                            values.iter().map(move |v| (name.clone(), v.clone()))
                        })
                        .collect::<async_nats::HeaderMap>(),
                )
            });
            let sent = match headers {
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
