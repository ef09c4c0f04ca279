//! The parameters of `POST /v1/charges`: a form-encoded body (as Stripe SDKs send it, with
//! nested `metadata[...]` keys), validated into [`ChargeParams`] or a Stripe 400.

use axum::response::Response;
use serde_json::Value;

use crate::errors::{invalid_param, missing_param, unknown_param};

/// The most metadata keys a charge carries.
const METADATA_KEYS_MAX: usize = 50;
/// The longest metadata key, in bytes.
const METADATA_KEY_LEN_MAX: usize = 40;
/// The longest metadata value, in bytes.
const METADATA_VALUE_LEN_MAX: usize = 500;

/// The validated parameters of `POST /v1/charges`.
pub struct ChargeParams {
    /// In the currency's smallest unit, 50 to 99 999 999.
    pub amount: u64,
    /// Three lowercase ASCII letters.
    pub currency: String,
    /// The card token (`tok_visa`), if any.
    pub source: Option<String>,
    /// The customer id, if any.
    pub customer: Option<String>,
    /// Free text, if any.
    pub description: Option<String>,
    /// From `metadata[KEY]=VALUE` pairs.
    pub metadata: serde_json::Map<String, Value>,
}

impl ChargeParams {
    /// Parses and validates a form-encoded body; the error is the response to send.
    pub fn parse(body: &[u8]) -> Result<ChargeParams, Box<Response>> {
        let mut amount = None;
        let mut currency = None;
        let mut params = ChargeParams {
            amount: 0,
            currency: String::new(),
            source: None,
            customer: None,
            description: None,
            metadata: serde_json::Map::new(),
        };
        for (name, value) in form_urlencoded::parse(body) {
            let value = value.into_owned();
            match name.as_ref() {
                "amount" => amount = Some(value),
                "currency" => currency = Some(value),
                "source" => params.source = Some(value),
                "customer" => params.customer = Some(value),
                "description" => params.description = Some(value),
                other => match other
                    .strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    Some(key)
                        if !key.is_empty()
                            && key.len() <= METADATA_KEY_LEN_MAX
                            && value.len() <= METADATA_VALUE_LEN_MAX =>
                    {
                        if params.metadata.len() >= METADATA_KEYS_MAX {
                            return Err(Box::new(invalid_param(
                                "metadata",
                                "parameter_invalid_empty",
                                "Metadata can have at most 50 keys.",
                            )));
                        }
                        params.metadata.insert(key.to_owned(), Value::String(value));
                    }
                    Some(_) => {
                        return Err(Box::new(invalid_param(
                            other,
                            "parameter_invalid_string",
                            "Metadata keys are 1 to 40 characters, values at most 500.",
                        )));
                    }
                    None => return Err(Box::new(unknown_param(other))),
                },
            }
        }
        let Some(amount) = amount else {
            return Err(Box::new(missing_param("amount")));
        };
        params.amount = match amount.parse::<u64>() {
            Ok(a) if (50..=99_999_999).contains(&a) => a,
            Ok(_) => {
                return Err(Box::new(invalid_param(
                    "amount",
                    "amount_too_small",
                    "Amount must be at least 50 (in the currency's smallest unit) and at most \
                     99999999.",
                )));
            }
            Err(_) => {
                return Err(Box::new(invalid_param(
                    "amount",
                    "parameter_invalid_integer",
                    &format!("Invalid integer: {amount}"),
                )));
            }
        };
        let Some(currency) = currency else {
            return Err(Box::new(missing_param("currency")));
        };
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(Box::new(invalid_param(
                "currency",
                "parameter_invalid_string",
                &format!("Invalid currency: {currency}. Use a three-letter ISO currency code."),
            )));
        }
        params.currency = currency.to_ascii_lowercase();
        Ok(params)
    }
}
