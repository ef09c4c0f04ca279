//! The chaos run's workload: logical payments by four tenants, each with the way it is sent.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::rng::Rng;

/// The tenants' API keys (the idempotency scopes).
pub const TENANTS: [&str; 4] = [
    "sk_test_alice_4eC39HqLyjWDarjtT1zdp7dc",
    "sk_test_bob_9fK2mQpL0aZxV7bN3cR8sT1u",
    "sk_test_carol_Q1w2E3r4T5y6U7i8O9p0AsDf",
    "sk_test_dave_Zx8Cv7Bn6Mm5Ll4Kk3Jj2Hh1G",
];

/// What one logical payment does.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sent over a flaky network: responses are dropped mid-flight, the client retries.
    Flaky,
    /// Eight concurrent copies of the same request.
    Storm,
    /// Completed, then the key is reused with another amount (400 `idempotency_error`), then
    /// retried as it was.
    Reuse,
    /// Invalid parameters: a Stripe 400 error, stored and replayed; no charge.
    Invalid,
}

impl Kind {
    /// How the summary names the kind.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Flaky => "flaky network",
            Kind::Storm => "duplicate storm",
            Kind::Reuse => "reused key",
            Kind::Invalid => "invalid parameters",
        }
    }
}

/// One logical payment: one order, one idempotency key, however many requests it takes.
pub struct Payment {
    /// `ord_NNNNN`, also sent as `metadata[order_id]`: the audit's key.
    pub order_id: String,
    /// An index into [`TENANTS`].
    pub tenant: usize,
    /// The `Idempotency-Key`.
    pub key: String,
    /// Whether the key is the previous payment's, used by another tenant.
    pub shares_key: bool,
    /// In cents.
    pub amount: u64,
    /// How it is sent.
    pub kind: Kind,
}

impl Payment {
    /// The form-encoded body of `POST /v1/charges`, for `amount` (a reused key sends another).
    pub fn body(&self, amount: u64) -> String {
        let currency = if self.kind == Kind::Invalid {
            "dollars"
        } else {
            "usd"
        };
        form_urlencoded::Serializer::new(String::new())
            .append_pair("amount", &amount.to_string())
            .append_pair("currency", currency)
            .append_pair("source", "tok_visa")
            .append_pair("description", &format!("Order {}", self.order_id))
            .append_pair("metadata[order_id]", &self.order_id)
            .finish()
    }

    /// The `Authorization` header: bearer for even tenants, basic (key as user name) for odd.
    pub fn authorization(&self) -> String {
        let key = TENANTS[self.tenant % TENANTS.len()];
        if self.tenant.is_multiple_of(2) {
            format!("Bearer {key}")
        } else {
            format!("Basic {}", BASE64.encode(format!("{key}:")))
        }
    }
}

/// Builds the workload: mostly flaky payments, some storms, reused keys and invalid requests;
/// one payment in twelve shares its idempotency key with another tenant's payment.
pub fn workload(count: usize, rng: &Rng) -> Vec<Arc<Payment>> {
    let mut payments: Vec<Arc<Payment>> = Vec::with_capacity(count);
    for i in 0..count {
        let payment = next_payment(i, payments.last().map(|p| &**p), rng);
        payments.push(Arc::new(payment));
    }
    payments
}

/// The workload's payment number `i`, drawn from `rng`, after `previous` (whose key it may
/// share): [`workload`] one payment at a time, for a run that lasts a time rather than a count.
pub fn next_payment(i: usize, previous: Option<&Payment>, rng: &Rng) -> Payment {
    let kind = match rng.below(100) {
        0..=64 => Kind::Flaky,
        65..=79 => Kind::Storm,
        80..=94 => Kind::Reuse,
        _ => Kind::Invalid,
    };
    let tenant = rng.below(TENANTS.len() as u64) as usize;
    let share = rng.chance(8);
    let (key, shares_key) = match previous {
        // The key of the previous payment, by another tenant: scopes keep the two apart.
        // (Only pairs: a third user of the key could be the first one's tenant.)
        Some(previous) if share && previous.tenant != tenant && !previous.shares_key => {
            (previous.key.clone(), true)
        }
        _ => (
            format!("{}-{}-{}", rng.token(8), rng.token(4), rng.token(12)),
            false,
        ),
    };
    Payment {
        order_id: format!("ord_{i:05}"),
        tenant,
        key,
        shares_key,
        amount: 500 + rng.below(100_000),
        kind,
    }
}
