//! The one back-off the agent waits with: 1 s, doubling to 30 s, reset by a success.
use std::{future::Future, time::Duration};

use tracing::warn;

use crate::Error;

const FIRST: Duration = Duration::from_secs(1);
const MOST: Duration = Duration::from_secs(30);

/// Delays between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(FIRST)
    }
}

impl Backoff {
    /// The delay before the next attempt (then doubled, up to 30 s).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(MOST);
        now
    }

    /// After a success: start again from 1 s.
    pub fn reset(&mut self) {
        self.0 = FIRST;
    }
}

/// Retries `f` with back-off until it succeeds, saying what it waits for.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut backoff = Backoff::default();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                crate::metrics::source_error("startup");
                let delay = backoff.next_delay();
                warn!(
                    "waiting for {what}: {e}; retrying in {delay:?} (pinned dataplane state keeps forwarding)"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_thirty_seconds_and_resets() {
        let mut b = Backoff::default();
        let secs: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay(), FIRST);
    }
}
