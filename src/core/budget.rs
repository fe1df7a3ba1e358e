//! The global in-flight byte budget: payload bytes held by requests and publishes that are on
//! their way through the gateway. When it is spent, new work gets `OVERLOADED` at once instead
//! of queueing without bound. A permit gives its bytes back when dropped, whatever happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::protocol::{ErrorCode, GatewayError};

pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, bytes: usize) -> Result<BudgetPermit, GatewayError> {
        if bytes == 0 {
            return Ok(BudgetPermit {
                budget: None,
                bytes,
            });
        }
        let before = self.used.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.limit {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "the gateway holds {before} of its {} in-flight payload bytes; retry later",
                    self.limit
                ),
            ));
        }
        Ok(BudgetPermit {
            budget: Some(self.clone()),
            bytes,
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[must_use]
pub struct BudgetPermit {
    budget: Option<Arc<ByteBudget>>,
    bytes: usize,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_refused_past_the_limit_and_returned_on_drop() {
        let budget = ByteBudget::new(100);
        let a = budget.try_acquire(60).unwrap();
        let err = budget.try_acquire(50).err().unwrap();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert_eq!(budget.used(), 60);
        drop(a);
        assert_eq!(budget.used(), 0);
        let _b = budget.try_acquire(100).unwrap();
        let _empty = budget.try_acquire(0).unwrap();
    }
}
