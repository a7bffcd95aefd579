//! The open-loop request schedule and coordinated-omission correction.
//!
//! An open-loop run sends requests at a fixed total rate, spread over `N` connections: request
//! `k` of connection `c` is due `(c + k·N) / rate` seconds after the start. HTTP/1.1 without
//! pipelining sends one request at a time per connection, so when a response is slow, the next
//! request of that connection goes out late. A closed-loop client would measure that request
//! from its late send time and hide the stall ("coordinated omission"). This module measures it
//! from the time it was due instead.
//!
//! The load generator's own timer has millisecond resolution, so requests also go out up to
//! about 1 ms late when the connection is idle. That lag is the client's, not the server's, and
//! must not be charged to the server. [`IdealQueue`] therefore replays each connection as a
//! perfect sender would have run it: every request leaves at its due time, or when the previous
//! response is complete, and takes the service time the server actually needed.

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
        let slot = self.connection + k * self.connections;
        Duration::from_secs_f64(slot as f64 / self.rate_per_s)
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
