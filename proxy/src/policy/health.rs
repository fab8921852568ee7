//! Active health checking thresholds: an endpoint goes down after `unhealthy_threshold`
//! failed checks in a row and comes back after `healthy_threshold` passed ones.

#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub healthy: bool,
    run: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthy: true,
            run: 0,
        }
    }
}

impl Health {
    /// Records one check; returns true when the endpoint's health changed.
    pub fn record(
        &mut self,
        passed: bool,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
    ) -> bool {
        if passed == self.healthy {
            self.run = 0;
            return false;
        }
        self.run += 1;
        let needed = if self.healthy {
            unhealthy_threshold
        } else {
            healthy_threshold
        };
        if self.run >= needed {
            self.healthy = passed;
            self.run = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let mut h = Health::default();
        assert!(!h.record(false, 3, 2));
        assert!(!h.record(false, 3, 2));
        assert!(!h.record(true, 3, 2), "a pass breaks the run");
        assert!(!h.record(false, 3, 2));
        assert!(!h.record(false, 3, 2));
        assert!(h.record(false, 3, 2));
        assert!(!h.healthy);
        assert!(!h.record(true, 3, 2));
        assert!(h.record(true, 3, 2));
        assert!(h.healthy);
    }
}
