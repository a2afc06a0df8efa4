//! The labels of the SQEs the nbd target pushes: a kind in the low 4 bits, the
//! connection's generation above, so that completions from a socket that was replaced
//! are recognized (`Connection::current`). The queue puts the label into the SQE's
//! user_data and hands it back with the completion.

/// Per request (`Ring::push`): a send of a chain (`SendChain`).
pub(super) const STEP_SEND: u16 = 1;
/// A payload receive straight into the request's buffer (`Receiver`).
pub(super) const STEP_PAYLOAD: u16 = 2;
/// The POLL_ADD linked in front of a READ_FIXED payload receive (`Receiver::post`).
pub(super) const STEP_POLL: u16 = 3;
/// A copy of a read's payload from the staging buffer into the request's pages
/// (`Ring::push_staged_copy`).
pub(super) const STEP_COPY: u16 = 4;
/// A copy of a write's payload out of the request's pages into the send chain's
/// staging buffer (`Ring::push_copy_from_request`, `SendChain::pump`).
pub(super) const STEP_STAGE: u16 = 5;
/// Target-wide (`Ring::push_event`): a receive into the staging buffer.
pub(super) const EVENT_RECV: u16 = 1;
/// The eventfd's read (`Connection::arm_wake`).
pub(super) const EVENT_WAKE: u16 = 2;
/// The request-timeout tick and the abort grace timer (`Timers`).
pub(super) const EVENT_TICK: u16 = 3;
pub(super) const EVENT_ABORT: u16 = 4;

/// The label of an SQE of `kind` on the connection of `generation`.
pub(super) fn step(kind: u16, generation: u16) -> u16 {
    kind | ((generation & 0x0fff) << 4)
}

/// `(kind, generation)` of a label (the generation's low 12 bits).
pub(super) fn split_step(step: u16) -> (u16, u16) {
    (step & 0xf, step >> 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_carry_the_generation() {
        for g in [0u16, 1, 0x0fff, 0x1000, 0xffff] {
            for k in [
                STEP_SEND,
                STEP_PAYLOAD,
                STEP_POLL,
                STEP_COPY,
                STEP_STAGE,
                EVENT_RECV,
                EVENT_TICK,
            ] {
                assert_eq!(split_step(step(k, g)), (k, g & 0x0fff));
            }
        }
    }
}
