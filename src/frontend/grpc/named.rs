//! The named-client rpcs (`Register`, `Presence`, `WatchPresence`): each is a session of one
//! named-client op, carried out by the same `Named` code as the socket's, its events written
//! from the session's outbox like a Subscribe stream's.

use std::sync::Arc;

use crate::core::{Caller, Gateway};
use crate::frontend::lifecycle::{Broken, Lifecycle};
use crate::frontend::outbox::Outbox;
use crate::frontend::session::Session;
use crate::protocol::{Envelope, Frontend, GatewayError, Id, Op, Outbound, PresenceInfo, Subject};

use super::pb;
use super::service::subscription_message;
use super::status::to_status;
use super::stream::{self, CarriedDrops, Ended, ResponseStream};

const FRONTEND: Frontend = Frontend::Grpc;

fn presence_reply(info: &PresenceInfo) -> pb::PresenceReply {
    pb::PresenceReply {
        name: info.name.clone(),
        online: info.online,
        gateway: info.gateway.clone().unwrap_or_default(),
        frontend: info.frontend.clone().unwrap_or_default(),
        connected_at: info.connected_at.clone().unwrap_or_default(),
        identity: info.identity.clone().unwrap_or_default(),
    }
}

/// Runs one named-client op on a new session; the session, or the call's status.
async fn open(
    gateway: &Gateway,
    caller: Caller,
    op: Op,
    target: String,
) -> Result<(Session, Outbound), tonic::Status> {
    let outbox = Arc::new(Outbox::new(gateway.config().subscription_queue));
    let mut session = Session::new(gateway.clone(), caller, outbox);
    let mut envelope = Envelope::new(op, Id::from(1));
    envelope.subject = (!target.is_empty()).then(|| Subject::from(target));
    match session.named_op(envelope).await {
        Outbound::Error { error, .. } => Err(to_status(&error)),
        answer => Ok((session, answer)),
    }
}

pub async fn presence(
    gateway: &Gateway,
    caller: Caller,
    name: String,
) -> Result<pb::PresenceReply, tonic::Status> {
    match open(gateway, caller, Op::Presence, name).await? {
        (_, Outbound::Presence { info, .. }) => Ok(presence_reply(&info)),
        _ => Err(to_status(&GatewayError::new(
            crate::protocol::ErrorCode::Internal,
            "presence gave no answer",
        ))),
    }
}

pub async fn register(
    gateway: &Gateway,
    caller: Caller,
    name: String,
) -> Result<ResponseStream<pb::NamedMessage>, tonic::Status> {
    let (session, _) = open(gateway, caller, Op::Register, name).await?;
    let (sender, response) = stream::channel();
    let gateway = gateway.clone();
    tokio::spawn(async move {
        let outbox = session.outbox().clone();
        let mut drops = CarriedDrops::default();
        let convert = |event: Outbound| match event {
            Outbound::Dropped { count, gap, .. } => {
                drops.add(count, gap);
                None
            }
            Outbound::Msg { message, .. } => {
                let message = subscription_message(&message, &mut drops);
                Some(pb::NamedMessage {
                    subject: message.subject,
                    headers: message.headers,
                    payload: message.payload,
                    reply_to: message.reply_to,
                    dropped: message.dropped,
                    gap: message.gap,
                    name_lost: false,
                })
            }
            Outbound::NameLost { .. } => {
                outbox.close();
                Some(pb::NamedMessage {
                    name_lost: true,
                    ..pb::NamedMessage::default()
                })
            }
            _ => None,
        };
        let status = serve(&gateway, session, &sender, convert).await;
        sender.finish(status);
    });
    Ok(response)
}

pub async fn watch(
    gateway: &Gateway,
    caller: Caller,
    pattern: String,
) -> Result<ResponseStream<pb::PresenceReply>, tonic::Status> {
    let (session, _) = open(gateway, caller, Op::PresenceWatch, pattern).await?;
    let (sender, response) = stream::channel();
    let gateway = gateway.clone();
    tokio::spawn(async move {
        let convert = |event: Outbound| match event {
            Outbound::Presence { info, .. } => Some(presence_reply(&info)),
            _ => None,
        };
        let status = serve(&gateway, session, &sender, convert).await;
        sender.finish(status);
    });
    Ok(response)
}

/// Writes the session's events until the client cancels or stops reading, the outbox is
/// closed, or the gateway shuts down; then the stream's final status (`None`: OK).
async fn serve<T: Send + 'static>(
    gateway: &Gateway,
    session: Session,
    sender: &stream::Sender<T>,
    convert: impl FnMut(Outbound) -> Option<T>,
) -> Option<tonic::Status> {
    let life = Lifecycle::new(gateway, FRONTEND);
    let outbox = session.outbox().clone();
    let ended = tokio::select! {
        ended = sender.write_outbox(&outbox, life.writes(), convert) => Some(ended),
        _ = gateway.shutdown().stopped() => None,
    };
    drop(session);
    outbox.abandon();
    match ended {
        None => Some(to_status(&GatewayError::new(
            crate::protocol::ErrorCode::Unavailable,
            "the gateway is shutting down",
        ))),
        Some(Ended::Broken(Broken::Stalled)) => Some(to_status(&GatewayError::new(
            crate::protocol::ErrorCode::Overloaded,
            "the client stopped reading; the stream is closed",
        ))),
        Some(Ended::Broken(Broken::Gone)) | Some(Ended::Done) => None,
    }
}
