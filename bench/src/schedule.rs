//! The open-loop request schedule and coordinated-omission correction.
//!
//! An open-loop run sends requests at a fixed total rate, spread over `N` connections: request
//! `k` of connection `c` is due `(c + k·N) / rate` seconds after the start. HTTP/1.1 without
//! pipelining sends one request at a time per connection, so when a response is slow, the next
//! request of that connection goes out late. A closed-loop client would measure that request
//! from its late send time and hide the stall ("coordinated omission"). This module measures it
//! from the time it was due instead.
//!
//! [`Pacer`] orders the requests of all connections by due time, so that one timer per
//! load-generator thread can release each request when it is due. A request can still leave
//! late, for example when the load-generator thread is busy with other responses at its due
//! time. That lag is the client's, not the server's, and must not be charged to the server.
//! [`IdealQueue`] therefore replays each connection as a perfect sender would have run it: every
//! request leaves at its due time, or when the previous response is complete, and takes the
//! service time the server actually needed.

use std::time::{Duration, Instant};

/// The due times of the requests of one connection in an open-loop run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    connection: u64,
    connections: u64,
    rate_per_s: f64,
}

impl Schedule {
    /// Creates the schedule of connection `connection` (0-based) of `connections`, sharing a
    /// total rate of `rate_per_s` requests per second.
    pub fn new(connection: usize, connections: usize, rate_per_s: f64) -> Self {
        Self {
            connection: connection as u64,
            connections: connections.max(1) as u64,
            rate_per_s,
        }
    }

    /// Returns when request `k` of this connection is due, counted from the start of the run.
    pub fn due(&self, k: u64) -> Duration {
        slot_due(self.connection + k * self.connections, self.rate_per_s)
    }

    /// Returns how many requests from `k` on are due before `end` (from the start of the run).
    pub fn due_before(&self, k: u64, end: Duration) -> u64 {
        let slots = end.as_secs_f64() * self.rate_per_s - self.connection as f64;
        if slots <= 0.0 {
            return 0;
        }
        let total = (slots / self.connections as f64).ceil() as u64;
        total.saturating_sub(k)
    }
}

/// Returns when global request `slot` of a run at `rate_per_s` is due, counted from the start.
/// [`Schedule`] and [`Pacer`] both use it, so they agree on every due time.
fn slot_due(slot: u64, rate_per_s: f64) -> Duration {
    Duration::from_secs_f64(slot as f64 / rate_per_s)
}

/// The release order of the open-loop requests of one load-generator thread.
///
/// Global request `i` of a run with `N` connections is due `i / rate` seconds after the start
/// and belongs to connection `i mod N`, as its request `i div N`. It is the same request, with
/// the same due time, as request `i div N` of that connection's [`Schedule`]. A thread runs a
/// subset of the connections, and its pacer visits only their requests, in due order.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// The ids of the thread's connections, ascending.
    connection_ids: Vec<usize>,
    connections: u64,
    rate_per_s: f64,
    /// Position of the next request to release in the thread's sequence. It is request
    /// `next / connection_ids.len()` of the connection at `next % connection_ids.len()`.
    next: u64,
}

/// One request that the pacer releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// Position of the connection in the thread's connection ids.
    pub slot: usize,
    /// Connection id, from 0 to `N - 1` over the whole run.
    pub connection: usize,
    /// Request index within the connection, as in [`Schedule::due`].
    pub request: u64,
}

impl Pacer {
    /// Creates the pacer of a thread that runs the connections `connection_ids` (ascending,
    /// each below `connections`) of a run at a total rate of `rate_per_s` requests per second.
    pub fn new(connection_ids: Vec<usize>, connections: usize, rate_per_s: f64) -> Self {
        debug_assert!(connection_ids.windows(2).all(|pair| pair[0] < pair[1]));
        debug_assert!(connection_ids.iter().all(|&id| id < connections));
        Self {
            connection_ids,
            connections: connections.max(1) as u64,
            rate_per_s,
            next: 0,
        }
    }

    /// Returns the request at `position` of the thread's sequence and its global index.
    fn at(&self, position: u64) -> (Release, u64) {
        let per_round = self.connection_ids.len() as u64;
        let slot = (position % per_round) as usize;
        let connection = self.connection_ids[slot];
        let request = position / per_round;
        let global = request * self.connections + connection as u64;
        (
            Release {
                slot,
                connection,
                request,
            },
            global,
        )
    }

    /// Returns when the next request to release is due, counted from the start of the run, or
    /// `None` when the thread has no connections.
    pub fn next_due(&self) -> Option<Duration> {
        if self.connection_ids.is_empty() {
            return None;
        }
        let (_, global) = self.at(self.next);
        Some(slot_due(global, self.rate_per_s))
    }

    /// Releases, in due order, every request not released yet that is due at or before
    /// `elapsed` (from the start of the run), and returns how many it released. After a late
    /// wake-up, this releases every request that fell due meanwhile.
    pub fn release_due(&mut self, elapsed: Duration, mut release: impl FnMut(Release)) -> u64 {
        let mut released = 0;
        while self.next_due().is_some_and(|due| due <= elapsed) {
            let (request, _) = self.at(self.next);
            release(request);
            self.next += 1;
            released += 1;
        }
        released
    }
}

/// The timeline of one connection driven by a perfect sender, for the corrected latency.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdealQueue {
    /// When the previous response would have been complete.
    previous_done: Option<Instant>,
}

impl IdealQueue {
    /// Records a request due at `due` that the server served in `service`, measured from the
    /// actual send to the complete response. Returns the corrected latency: the time from
    /// `due` until the request would have been complete, including any wait behind the
    /// previous request of the connection.
    pub fn latency(&mut self, due: Instant, service: Duration) -> Duration {
        let start = match self.previous_done {
            Some(done) if done > due => done,
            _ => due,
        };
        let done = start + service;
        self.previous_done = Some(done);
        done - due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_interleave_due_times() {
        let rate = 1000.0;
        let first = Schedule::new(0, 4, rate);
        let second = Schedule::new(1, 4, rate);
        assert_eq!(first.due(0), Duration::ZERO);
        assert_eq!(second.due(0), Duration::from_millis(1));
        assert_eq!(first.due(1), Duration::from_millis(4));
        assert_eq!(second.due(2), Duration::from_millis(9));
    }

    #[test]
    fn due_before_counts_remaining_slots() {
        // Connection 1 of 4 at 1000/s is due at 1, 5, 9, ... ms: 3 before 10 ms.
        let schedule = Schedule::new(1, 4, 1000.0);
        assert_eq!(schedule.due_before(0, Duration::from_millis(10)), 3);
        assert_eq!(schedule.due_before(2, Duration::from_millis(10)), 1);
        assert_eq!(schedule.due_before(5, Duration::from_millis(10)), 0);
    }

    #[test]
    fn due_before_start_is_zero() {
        let schedule = Schedule::new(3, 4, 1000.0);
        assert_eq!(schedule.due_before(0, Duration::from_millis(2)), 0);
    }

    /// Releases everything due by `elapsed` and returns `(connection, request)` pairs.
    fn release_until(pacer: &mut Pacer, elapsed: Duration) -> Vec<(usize, u64)> {
        let mut released = Vec::new();
        pacer.release_due(elapsed, |r| released.push((r.connection, r.request)));
        released
    }

    #[test]
    fn pacer_assigns_indices_round_robin() {
        // 4 connections at 1000/s: global request i is due at i ms and goes to connection i % 4.
        let mut pacer = Pacer::new((0..4).collect(), 4, 1000.0);
        let released = release_until(&mut pacer, Duration::from_millis(9));
        let expected: Vec<(usize, u64)> = (0..10u64).map(|i| ((i % 4) as usize, i / 4)).collect();
        assert_eq!(released, expected);
    }

    #[test]
    fn pacer_slot_indexes_thread_connections() {
        let mut pacer = Pacer::new(vec![2, 6], 8, 1000.0);
        let mut slots = Vec::new();
        pacer.release_due(Duration::from_millis(20), |r| {
            slots.push((r.slot, r.connection));
        });
        assert_eq!(slots, vec![(0, 2), (1, 6), (0, 2), (1, 6), (0, 2)]);
    }

    #[test]
    fn pacer_due_matches_connection_schedule() {
        let connections = 64;
        let rate = 34_687.0;
        let mut pacer = Pacer::new((0..connections).collect(), connections, rate);
        for _ in 0..1000 {
            let due = pacer.next_due().unwrap();
            let mut released = Vec::new();
            pacer.release_due(due, |r| released.push(r));
            assert!(!released.is_empty(), "nothing released at {due:?}");
            for r in released {
                let schedule = Schedule::new(r.connection, connections, rate);
                assert_eq!(schedule.due(r.request), due, "{r:?}");
            }
        }
    }

    #[test]
    fn pacer_thread_skips_other_connections() {
        // 5 connections on 2 threads: thread 1 runs connections 1 and 3, which own global
        // requests 1, 3, 6, 8, 11, 13, ...
        let mut pacer = Pacer::new(vec![1, 3], 5, 1000.0);
        assert_eq!(pacer.next_due(), Some(Duration::from_millis(1)));
        let released = release_until(&mut pacer, Duration::from_millis(13));
        assert_eq!(
            released,
            vec![(1, 0), (3, 0), (1, 1), (3, 1), (1, 2), (3, 2)]
        );
        assert_eq!(pacer.next_due(), Some(Duration::from_millis(16)));
    }

    #[test]
    fn pacer_threads_cover_every_request_once() {
        let connections = 7;
        let threads = 3;
        let end = Duration::from_millis(49);
        let mut globals = Vec::new();
        for thread in 0..threads {
            let ids: Vec<usize> = (thread..connections).step_by(threads).collect();
            let mut pacer = Pacer::new(ids, connections, 1000.0);
            for (connection, request) in release_until(&mut pacer, end) {
                globals.push(request * connections as u64 + connection as u64);
            }
        }
        globals.sort_unstable();
        assert_eq!(globals, (0..50).collect::<Vec<u64>>());
    }

    #[test]
    fn pacer_counts_requests_due_at_time() {
        let mut pacer = Pacer::new((0..4).collect(), 4, 1000.0);
        // Request 0 is due at the start itself.
        assert_eq!(pacer.release_due(Duration::ZERO, |_| {}), 1);
        // Requests 1 and 2 are due at 1 and 2 ms. Request 3, at 3 ms, is not due yet.
        assert_eq!(pacer.release_due(Duration::from_micros(2500), |_| {}), 2);
        // Nothing is released twice.
        assert_eq!(pacer.release_due(Duration::from_micros(2500), |_| {}), 0);
        assert_eq!(pacer.next_due(), Some(Duration::from_millis(3)));
    }

    #[test]
    fn pacer_catches_up_after_late_wake() {
        let mut pacer = Pacer::new((0..3).collect(), 3, 1000.0);
        assert_eq!(release_until(&mut pacer, Duration::from_millis(1)).len(), 2);
        // The next wake-up comes 8 ms late: requests 2 to 10 are all due and leave in order.
        let released = release_until(&mut pacer, Duration::from_millis(10));
        let expected: Vec<(usize, u64)> = (2..=10u64).map(|i| ((i % 3) as usize, i / 3)).collect();
        assert_eq!(released, expected);
        assert_eq!(pacer.next_due(), Some(Duration::from_millis(11)));
    }

    #[test]
    fn pacer_without_connections_releases_nothing() {
        let mut pacer = Pacer::new(Vec::new(), 4, 1000.0);
        assert_eq!(pacer.next_due(), None);
        assert_eq!(pacer.release_due(Duration::from_secs(1), |_| {}), 0);
    }

    #[test]
    fn idle_connection_charges_service_only() {
        let start = Instant::now();
        let mut queue = IdealQueue::default();
        let service = Duration::from_micros(400);
        assert_eq!(queue.latency(start, service), service);
        assert_eq!(
            queue.latency(start + Duration::from_millis(1), service),
            service
        );
    }

    #[test]
    fn slow_response_delays_next_request() {
        let start = Instant::now();
        let mut queue = IdealQueue::default();
        // The first response takes 5 ms, the next request is due 1 ms after the first.
        assert_eq!(
            queue.latency(start, Duration::from_millis(5)),
            Duration::from_millis(5)
        );
        assert_eq!(
            queue.latency(start + Duration::from_millis(1), Duration::from_micros(500)),
            Duration::from_micros(4500)
        );
    }

    #[test]
    fn backlog_drains_after_stall() {
        let start = Instant::now();
        let mut queue = IdealQueue::default();
        let ms = Duration::from_millis;
        let latencies: Vec<Duration> = [(0, ms(10)), (2, ms(1)), (4, ms(1)), (20, ms(1))]
            .into_iter()
            .map(|(due, service)| queue.latency(start + ms(due), service))
            .collect();
        assert_eq!(latencies, vec![ms(10), ms(9), ms(8), ms(1)]);
    }
}
