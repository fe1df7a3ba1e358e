//! Size guards for what every topic keeps for its whole life (artifacts/memory/ has the
//! measured costs): a topic's dispatcher task holds its future, so the future must not carry
//! the one-off opening inline.

use super::*;

fn future_size<A, B, C, F: Future>(_: fn(A, B, C) -> F) -> usize {
    size_of::<F>()
}

#[test]
fn a_topics_dispatcher_future_stays_small() {
    // 1,416 bytes with the opening inline; 392 with it boxed.
    let size = future_size(dispatch_topic);
    assert!(size <= 448, "dispatch_topic's future is {size} bytes");
}
