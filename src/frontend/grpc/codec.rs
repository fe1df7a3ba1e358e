//! The protobuf codec of the generated gRPC code (`build.rs` names it): tonic's prost codec
//! with smaller per-call buffers. tonic gives every call an 8 KiB buffer to decode the request
//! into and another to encode the reply into; at a few hundred calls in flight those came from
//! the allocator's slow path (new slabs, extent searches: about 4 % of the gateway's CPU per
//! unary call). A gateway message is its payload and a few fields, mostly far smaller; a larger
//! one grows its buffer as before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::prost::Message;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Each call's encode and decode buffers start at this size.
const BUFFER_BYTES: usize = 1024;
/// tonic's default: a stream yields after this many encoded bytes.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// The codec the generated client and server use.
#[derive(Debug)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
