//! Between the wire's types and async-nats's: subjects, headers and delivered messages cross
//! here, and NATS's errors become error codes here, once, for every operation.

use async_nats::client::{PublishError, PublishErrorKind, SubscribeError};
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};

use crate::protocol::{Delivery, ErrorCode, GatewayError, Headers, Subject};

/// A wire subject as async-nats takes it (no copy).
pub fn subject(subject: &Subject) -> async_nats::Subject {
    // SAFETY: a `Subject`'s bytes are UTF-8 (every constructor checks or is given text).
    unsafe { async_nats::Subject::from_bytes_unchecked(subject.as_bytes().clone()) }
}

/// Wire headers as a NATS header map. `Headers` were checked with the same rules async-nats
/// applies, so no header is refused here; should the two ever disagree, the client gets a
/// `BAD_REQUEST` naming the header rather than a panic.
pub fn header_map(headers: &Headers) -> Result<HeaderMap, GatewayError> {
    header_map_without(headers, |_| false)
}

/// `header_map` without the headers whose names `skip` picks (the client's trace context,
/// which the gateway replaces with its own).
pub fn header_map_without(
    headers: &Headers,
    skip: impl Fn(&str) -> bool,
) -> Result<HeaderMap, GatewayError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers.pairs().filter(|(name, _)| !skip(name)) {
        let (Ok(name_ok), Ok(value_ok)) =
            (name.parse::<HeaderName>(), value.parse::<HeaderValue>())
        else {
            return Err(GatewayError::bad_request(format!(
                "header {name:?} cannot be sent to NATS"
            )));
        };
        map.append(name_ok, value_ok);
    }
    Ok(map)
}

/// A NATS header map as wire headers (`None` when empty).
pub fn headers(map: Option<&HeaderMap>) -> Option<Headers> {
    let map = map.filter(|map| !map.is_empty())?;
    let mut headers = Headers::new();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        for value in values {
            headers.append_trusted(name, value.as_str().to_owned());
        }
    }
    Some(headers)
}

/// A NATS subject as a wire subject.
fn wire_subject(subject: &async_nats::Subject) -> Subject {
    Subject::from(subject.as_str())
}

/// The sid async-nats gave a subscription: its slow-consumer events name subscriptions by it.
/// async-nats keeps the field private but prints it (`Subscriber { sid: 7, .. }`); a test
/// against a real server checks that this still reads it.
pub fn subscriber_sid(subscriber: &async_nats::Subscriber) -> Option<u64> {
    let printed = format!("{subscriber:?}");
    let rest = printed.split_once("sid: ")?.1;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// A message from NATS as a client sees it.
pub fn delivery(message: async_nats::Message) -> Delivery {
    Delivery {
        subject: wire_subject(&message.subject),
        reply_to: message.reply.as_ref().map(wire_subject),
        headers: headers(message.headers.as_ref()),
        payload: message.payload,
        seq: None,
        json_tail: Default::default(),
    }
}

/// What a failed publish (a request's too) means to the client.
pub fn publish_error(error: &PublishError) -> GatewayError {
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => GatewayError::new(
            ErrorCode::TooLarge,
            format!("NATS refused the payload: {error}"),
        ),
        PublishErrorKind::InvalidSubject => {
            GatewayError::bad_request(format!("NATS refused the subject: {error}"))
        }
        PublishErrorKind::Send => GatewayError::new(
            ErrorCode::Unavailable,
            format!("NATS could not take the message: {error}"),
        ),
    }
}

/// What a failed subscribe means to the client.
pub fn subscribe_error(error: &SubscribeError) -> GatewayError {
    GatewayError::new(
        ErrorCode::Unavailable,
        format!("NATS subscribe failed: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_cross_both_ways_unchanged() {
        let mut wire = Headers::new();
        wire.append("X-Trace", "abc").unwrap();
        wire.append("X-Multi", "1").unwrap();
        wire.append("X-Multi", "2").unwrap();
        let map = header_map(&wire).unwrap();
        assert_eq!(map.get_all("X-Multi").count(), 2);
        let back = headers(Some(&map)).unwrap();
        let mut pairs: Vec<_> = back.pairs().collect();
        pairs.sort();
        assert_eq!(
            pairs,
            [("X-Multi", "1"), ("X-Multi", "2"), ("X-Trace", "abc")]
        );
        assert_eq!(headers(Some(&HeaderMap::new())), None);
    }

    #[test]
    fn a_publish_error_has_one_code_whatever_the_operation() {
        let invalid = PublishError::new(PublishErrorKind::InvalidSubject);
        assert_eq!(publish_error(&invalid).code, ErrorCode::BadRequest);
        let too_large = PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(publish_error(&too_large).code, ErrorCode::TooLarge);
        let send = PublishError::new(PublishErrorKind::Send);
        assert_eq!(publish_error(&send).code, ErrorCode::Unavailable);
    }

    #[test]
    fn subjects_cross_without_a_copy() {
        let wire = Subject::from("demo.echo");
        let nats = subject(&wire);
        assert_eq!(nats.as_str(), "demo.echo");
        assert_eq!(nats.as_ptr(), wire.as_ptr());
    }
}
