//! Releases the requests of an open-loop run at their due times, with a timer of nanosecond
//! resolution.
//!
//! tokio's timer has millisecond resolution, so requests paced by it leave in bursts at
//! millisecond ticks. The pacer instead arms a timerfd on `CLOCK_MONOTONIC` with the absolute due
//! time of the next request. The kernel runs it as a high-resolution timer with no timer slack
//! (`timerfd_setup` in `fs/timerfd.c` starts its hrtimer with a zero range), and epoll wakes
//! the runtime when it fires. So a request leaves late only by the wake-up latency of the
//! thread and by the work the thread is busy with. Each load-generator thread runs one pacer
//! task next to its connection tasks on its current-thread runtime, so a release only wakes a
//! local task. No extra thread and no cross-thread wake-up cost time on the client CPU.

use std::{cell::Cell, io, time::Duration, time::Instant};

use nix::{
    sys::{
        time::{TimeSpec, TimeValLike as _},
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    },
    time::{clock_gettime, ClockId as Clock},
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::Notify,
};

use super::Window;
use crate::schedule::Pacer;

/// Maximum time the pacer sleeps before it checks whether the run was stopped.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The requests that the pacer has released to one connection.
#[derive(Debug, Default)]
pub(super) struct Permits {
    released: Cell<u64>,
    /// Set when the pacer ends, so that no more requests will be released.
    closed: Cell<bool>,
    notify: Notify,
}

impl Permits {
    fn release(&self) {
        self.released.set(self.released.get() + 1);
        self.notify.notify_one();
    }

    fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }

    /// Waits until request `k` of the connection has been released, and returns `false`
    /// instead when the pacer ended before it released the request.
    pub(super) async fn wait_for(&self, k: u64) -> bool {
        loop {
            if self.released.get() > k {
                return true;
            }
            if self.closed.get() {
                return false;
            }
            self.notify.notified().await;
        }
    }
}

/// A one-shot timer on `CLOCK_MONOTONIC` with nanosecond resolution, registered with the tokio
/// runtime of the thread that created it.
pub(super) struct DeadlineTimer {
    fd: AsyncFd<TimerFd>,
    /// An `Instant` and the `CLOCK_MONOTONIC` reading taken right after it. `Instant` reads
    /// the same clock on Linux, so the two differ by the time between the readings only.
    base_instant: Instant,
    base_clock: Duration,
}

impl DeadlineTimer {
    /// Creates the timer. It must be called inside a tokio runtime with I/O enabled.
    ///
    /// # Errors
    /// Fails when `timerfd_create` or `clock_gettime` fail, or when the runtime cannot
    /// register the timer.
    pub(super) fn new() -> io::Result<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| io::Error::other(format!("timerfd_create failed: {e}")))?;
        let base_instant = Instant::now();
        let now = clock_gettime(Clock::CLOCK_MONOTONIC)
            .map_err(|e| io::Error::other(format!("clock_gettime failed: {e}")))?;
        let base_clock = Duration::from_nanos(now.num_nanoseconds().max(0) as u64);
        Ok(Self {
            fd: register(timer)?,
            base_instant,
            base_clock,
        })
    }

    /// Sleeps until `deadline`, or returns at once when it has passed.
    ///
    /// # Errors
    /// Fails when `timerfd_settime` fails or the runtime cannot poll the timer.
    pub(super) async fn sleep_until(&self, deadline: Instant) -> io::Result<()> {
        if deadline <= Instant::now() {
            return Ok(());
        }
        let clock = self.base_clock + deadline.saturating_duration_since(self.base_instant);
        self.fd
            .get_ref()
            .set(
                Expiration::OneShot(TimeSpec::from_duration(clock)),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            )
            .map_err(|e| io::Error::other(format!("timerfd_settime failed: {e}")))?;
        loop {
            // The expiration count is never read, which saves a system call per request. The
            // next `timerfd_settime` resets it, and epoll (edge-triggered in tokio) reports each
            // expiration as a new event even when the count was not read.
            let mut guard = self.fd.readable().await?;
            guard.clear_ready();
            // The timer cannot fire before `deadline`, because the base `CLOCK_MONOTONIC`
            // reading was taken after `base_instant`, so `clock` is at or after `deadline`.
            // This check only skips a readiness left from an earlier deadline.
            if Instant::now() >= deadline {
                return Ok(());
            }
        }
    }
}

/// Registers `timer` for readability with the tokio runtime of the current thread.
#[allow(unsafe_code)]
fn register(timer: TimerFd) -> io::Result<AsyncFd<TimerFd>> {
    // SAFETY: `TimerFd` owns its file descriptor. It returns the same descriptor from every
    // `as_raw_fd` call and closes it only when dropped, and the `AsyncFd` owns the `TimerFd`
    // until the `AsyncFd` itself is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) };
    registered.map_err(io::Error::from)
}

/// Releases the requests of `pacer` to `permits` (indexed by [`Release::slot`]) when each is
/// due, until the last request due before the end of `window`, or until `stopped` returns
/// `true`. Closes every permit when it ends, also on an error or a panic.
///
/// Two wake-ups are at least `resolution` apart, so requests that fall due within
/// `resolution` of the previous wake-up leave together at the next one. Every wake-up of an
/// idle thread costs client CPU time, and this bounds their number.
///
/// [`Release::slot`]: crate::schedule::Release::slot
///
/// # Errors
/// Fails when the timer fails. The connections then stop at their next request.
pub(super) async fn release_requests(
    mut pacer: Pacer,
    timer: DeadlineTimer,
    permits: &[Permits],
    window: Window,
    resolution: Duration,
    stopped: impl Fn() -> bool,
) -> io::Result<()> {
    let _close = ClosePermits(permits);
    let run_len = window.end - window.start;
    let mut previous_wake = window.start;
    while let Some(due) = pacer.next_due() {
        if due >= run_len || stopped() {
            break;
        }
        let deadline = (window.start + due).max(previous_wake + resolution);
        let wake = deadline.min(Instant::now() + STOP_CHECK_INTERVAL);
        timer.sleep_until(wake).await?;
        previous_wake = Instant::now();
        let elapsed = Instant::now().saturating_duration_since(window.start);
        pacer.release_due(elapsed.min(run_len), |release| {
            if let Some(connection) = permits.get(release.slot) {
                connection.release();
            }
        });
    }
    Ok(())
}

/// Closes every permit when dropped, so that no connection waits forever for a pacer that
/// returned, failed, panicked or was dropped with its runtime.
struct ClosePermits<'a>(&'a [Permits]);

impl Drop for ClosePermits<'_> {
    fn drop(&mut self) {
        for connection in self.0 {
            connection.close();
        }
    }
}
