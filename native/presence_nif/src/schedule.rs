//! What a NIF on a normal scheduler charges its caller for, so that the
//! BEAM preempts a busy caller in time: a NIF call otherwise counts as one
//! reduction, whatever it did.

use std::time::Instant;

use rustler::Env;

/// A timeslice, as `enif_consume_timeslice` counts it: 1 ms.
const TIMESLICE_US: u128 = 1_000;

/// Bytes of listing decoded in about one timeslice, to charge a caller in
/// proportion to the work a list does inline.
const BYTES_PER_TIMESLICE: usize = 256 * 1024;

/// Charges the calling process's reductions for a write's time in the NIF
/// when it is dropped, at least 1% of a timeslice: a process writing in a
/// loop would otherwise run for many milliseconds between preemptions, and
/// a process waiting on its scheduler (a ticker, a channel) that long.
pub(crate) struct Charge<'a> {
    env: Env<'a>,
    started: Instant,
}

impl<'a> Charge<'a> {
    pub(crate) fn start(env: Env<'a>) -> Self {
        Charge {
            env,
            started: Instant::now(),
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        let micros = self.started.elapsed().as_micros();
        let percent = (micros * 100).div_ceil(TIMESLICE_US).clamp(1, 100);
        rustler::schedule::consume_timeslice(self.env, percent as i32);
    }
}

/// Charges the calling process's reductions for decoding `bytes` of
/// listing on its scheduler.
pub(crate) fn charge_for_bytes(env: Env, bytes: usize) {
    let percent = (bytes * 100).div_ceil(BYTES_PER_TIMESLICE).clamp(1, 100);
    rustler::schedule::consume_timeslice(env, percent as i32);
}
