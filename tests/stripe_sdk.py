"""The official Stripe SDK (stripe-python) against the payments demo: run by tests/stripe_sdk.rs.

Usage: python stripe_sdk.py BASE_URL

Prints one JSON object: what the SDK returned or raised in each scenario. The Rust test asserts
on it; this script only fails (exit 1) when the SDK itself cannot be driven.
"""

import json
import sys
import threading
import uuid

import stripe

API_KEY = "sk_test_idemstore_stripe_sdk"
PARAMS = {"amount": 500, "currency": "usd", "source": "tok_visa"}


def client(base, retries):
    return stripe.StripeClient(
        API_KEY, base_addresses={"api": base}, max_network_retries=retries
    )


def create(sdk, key, params=None):
    return sdk.v1.charges.create(
        params=dict(params or PARAMS), options={"idempotency_key": key}
    )


def raised(error):
    """What an SDK exception tells its caller."""
    body = error.error
    return {
        "class": type(error).__name__,
        "http_status": error.http_status,
        "message": error.user_message,
        "type": getattr(body, "type", None),
        "code": getattr(body, "code", None),
    }


def replayed(charge):
    return charge.last_response.headers.get("idempotent-replayed")


def storm(base, retries, copies):
    """`copies` threads send the same charge with one key at once; returns what each got."""
    key = "storm-" + uuid.uuid4().hex
    barrier = threading.Barrier(copies)
    results = [None] * copies

    def one(i):
        sdk = client(base, retries)
        barrier.wait()
        try:
            charge = create(sdk, key)
            results[i] = {"id": charge.id, "replayed": replayed(charge)}
        except stripe.StripeError as error:
            results[i] = {"error": raised(error)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main():
    base = sys.argv[1]
    sdk = client(base, 0)
    out = {"sdk_version": stripe.VERSION}

    # A charge, then its retry with the same key: the same charge, replayed.
    key = "sdk-" + uuid.uuid4().hex
    first = create(sdk, key)
    retry = create(sdk, key)
    out["first"] = {"id": first.id, "amount": first.amount, "replayed": replayed(first)}
    out["retry"] = {"id": retry.id, "amount": retry.amount, "replayed": replayed(retry)}
    out["key"] = key

    # The same key with other parameters: Stripe's SDK raises its IdempotencyError.
    try:
        other = create(sdk, key, dict(PARAMS, amount=501))
        out["reused"] = {"id": other.id}
    except stripe.StripeError as error:
        out["reused"] = raised(error)
        out["reused_is_idempotency_error"] = isinstance(error, stripe.IdempotencyError)

    # Duplicates while the original is in flight, without the SDK's retries: until one storm
    # shows a 409 (the handler takes a few milliseconds, so most storms do).
    out["storms_without_retries"] = []
    for _ in range(20):
        results = storm(base, 0, 8)
        out["storms_without_retries"].append(results)
        if any("error" in r for r in results):
            break

    # The same with the SDK's retries (it retries a 409): every copy gets the one charge.
    out["storm_with_retries"] = storm(base, 3, 8)

    print(json.dumps(out))


if __name__ == "__main__":
    main()
