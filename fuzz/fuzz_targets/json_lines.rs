//! The JSON-lines decoder (`WireDecoder` on a stream that does not start with 0xC1), fed each
//! input whole and split in two: both must give the same items, every envelope must re-encode
//! to a canonical line that decodes to it again, every refusal must carry a stable code, and
//! the decoder must never buffer more than the limit while it waits.
#![no_main]

use ipc_gateway::protocol::binary::MAGIC;
use ipc_gateway_fuzz::{check_stream, control};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((control, rest)) = control(data) else {
        return;
    };
    // The first byte picks the format; this target stays on JSON lines.
    let mut input = rest.to_vec();
    if let Some(first) = input.first_mut().filter(|first| **first == MAGIC) {
        *first = b' ';
    }
    check_stream(&input, control, false);
});
