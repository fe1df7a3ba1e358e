//! The streaming binary-frame decoder (`WireDecoder` after it has sniffed 0xC1), fed each input
//! whole and split in two: both must give the same items, every frame must re-encode to its
//! canonical form, every refusal must carry a stable code, and the decoder must never buffer
//! more than the limit while it waits (checks in the fuzz crate's lib).
#![no_main]

use ipc_gateway::protocol::binary::MAGIC;
use ipc_gateway_fuzz::{check_stream, control};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((control, rest)) = control(data) else {
        return;
    };
    // The first byte picks the format; this target stays on binary frames.
    let mut input = rest.to_vec();
    if let Some(first) = input.first_mut() {
        *first = MAGIC;
    }
    check_stream(&input, control, true);
});
