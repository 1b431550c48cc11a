//! The endpoints (spec: specs/gateway.allium; document: engine/openapi.json).
//!
//! Every answer is JSON with a stable error code on failure (docs/design.md §8). A movement is
//! answered only with its certified output (spec: Gateway.AnsweredWhenCertified).

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;
use tribunal_shards::envelope::{bounded_detail, AdminCommand, Envelope};
use tribunal_shards::inventory::{Inventory, InventoryCommand, StockKey};

use super::certified_view::{Answer, CertifiedView, Lookup};
use super::http_io::Phase;
use super::GatewayShared;
use crate::log::appender::{AppendRequest, QueueError};
use crate::publish::json::OutputJson;

/// The longest delay the admin API injects (a longer one would stall certification).
const MAX_INJECTED_DELAY_MS: u64 = 60_000;

/// The OpenAPI document, kept in the repository and served verbatim.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

type Body = Full<Bytes>;

/// An answer before it becomes a hyper response.
pub struct Answered {
    status: StatusCode,
    body: Vec<u8>,
    content_type: &'static str,
}

impl Answered {
    fn json(status: StatusCode, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("answers serialise");
        Self { status, body, content_type: "application/json" }
    }

    fn error(status: StatusCode, code: &str, message: &str) -> Self {
        Self { status, body: error_body(code, message), content_type: "application/json" }
    }
}

/// `{"error": {"code", "message"}}`: the one error shape.
pub fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "error": { "code": code, "message": message } })).expect("errors serialise")
}

/// Routes a request, records its latency, and marks the connection idle again.
pub async fn handle(shared: &GatewayShared, request: Request<Incoming>, phase: &Cell<Phase>) -> Response<Body> {
    let started = Instant::now();
    let has_body = !hyper::body::Body::is_end_stream(request.body());
    let (route, answered, body_read) = route(shared, request, phase).await;
    shared.metrics.observe(route, answered.status.as_u16(), started.elapsed().as_secs_f64());
    phase.set(Phase::Idle { since: Instant::now() });
    let mut response = Response::new(Full::new(Bytes::from(answered.body)));
    *response.status_mut() = answered.status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(answered.content_type));
    if has_body && !body_read {
        response.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The route's name, its answer, and whether the request's body was read.
async fn route(
    shared: &GatewayShared,
    request: Request<Incoming>,
    phase: &Cell<Phase>,
) -> (&'static str, Answered, bool) {
    // A refusal that leaves a body unread closes the connection: hyper would otherwise
    // drain the body after the answer, and the watchdog would take that for a new, slow
    // request.
    let body_read = Cell::new(false);
    let (name, answered) = route_inner(shared, request, &Connection { phase, body_read: &body_read }).await;
    (name, answered, body_read.get())
}

/// What a handler may mark on its connection.
struct Connection<'a> {
    phase: &'a Cell<Phase>,
    body_read: &'a Cell<bool>,
}

async fn route_inner(
    shared: &GatewayShared,
    request: Request<Incoming>,
    connection: &Connection<'_>,
) -> (&'static str, Answered) {
    let phase = connection.phase;
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segments.as_slice() {
        ["v1", "movements"] if post => ("post_movements", post_movement(shared, request, connection).await),
        ["v1", "stock", warehouse, sku] if get => {
            phase.set(Phase::Handling);
            ("get_stock_entry", stock_entry(shared, warehouse, sku, request.uri().query()))
        }
        ["v1", "stock"] if get => {
            phase.set(Phase::Handling);
            ("get_stock_by_sku", stock_by_sku(shared, request.uri().query()))
        }
        ["v1", "cluster"] if get => ("get_cluster", cluster(shared)),
        ["healthz"] if get => ("healthz", health(shared)),
        ["metrics"] if get => {
            let text = shared.metrics.render();
            let answered = Answered {
                status: StatusCode::OK,
                body: text.into_bytes(),
                content_type: "text/plain; version=0.0.4; charset=utf-8",
            };
            ("metrics", answered)
        }
        ["openapi.json"] if get => {
            let answered = Answered {
                status: StatusCode::OK,
                body: OPENAPI_JSON.as_bytes().to_vec(),
                content_type: "application/json",
            };
            ("openapi", answered)
        }
        ["v1", "admin", ..] if shared.config.admin_token.is_none() => {
            ("admin", Answered::error(StatusCode::NOT_FOUND, "not_found", "no such resource"))
        }
        ["v1", "admin", action @ ..] if post => ("admin", admin(shared, request, action, connection).await),
        ["v1", "movements"]
        | ["v1", "stock", ..]
        | ["v1", "cluster"]
        | ["healthz"]
        | ["metrics"]
        | ["openapi.json"]
        | ["v1", "admin", ..] => (
            "method_not_allowed",
            Answered::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{method} is not allowed here"),
            ),
        ),
        _ => ("not_found", Answered::error(StatusCode::NOT_FOUND, "not_found", "no such resource")),
    }
}

/// spec: Gateway.NotReadyRefuses
fn not_ready(shared: &GatewayShared) -> Option<Answered> {
    if shared.node.ready.load(Ordering::Acquire) {
        return None;
    }
    let reason = shared.node.not_ready_reason.lock().expect("not poisoned").clone();
    Some(Answered::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        &format!("this instance is not ready: {reason}"),
    ))
}

/// Reads a JSON body within the size bound (spec: Gateway.BodyTooLarge).
async fn read_body(
    shared: &GatewayShared,
    request: Request<Incoming>,
    connection: &Connection<'_>,
) -> Result<Bytes, Answered> {
    let limit = shared.config.max_body_bytes;
    let too_large = || {
        Answered::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("the body is larger than {limit} bytes"),
        )
    };
    let declared =
        request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => {
            connection.body_read.set(true);
            connection.phase.set(Phase::Handling);
            Ok(collected.to_bytes())
        }
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(Answered::error(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            &format!("the body could not be read: {}", bounded_detail(&e.to_string())),
        )),
    }
}

fn idempotency_key(request: &Request<Incoming>) -> Result<String, Answered> {
    let Some(value) = request.headers().get("idempotency-key") else {
        return Err(Answered::error(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "an Idempotency-Key header is required; a retry must reuse it",
        ));
    };
    let key = value.to_str().ok().filter(|k| tribunal_shards::envelope::valid_key(k));
    key.map(str::to_owned).ok_or_else(|| {
        Answered::error(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "the Idempotency-Key must be 1..=128 printable ASCII characters",
        )
    })
}

async fn post_movement(shared: &GatewayShared, request: Request<Incoming>, connection: &Connection<'_>) -> Answered {
    let (key, body) = match keyed_body(shared, request, connection).await {
        Ok(keyed) => keyed,
        Err(refused) => return refused,
    };
    // spec: Gateway.InvalidInputRefused
    match parse_json::<InventoryCommand>(&body, "the body is not a movement") {
        Ok(command) => submit(shared, Envelope::<Inventory>::domain(key, command)).await,
        Err(refused) => refused,
    }
}

/// What every command sent through the log needs first: a ready instance, a valid
/// Idempotency-Key and a body within bounds (spec: Gateway.NotReadyRefuses,
/// Gateway.InvalidInputRefused, Gateway.BodyTooLarge).
async fn keyed_body(
    shared: &GatewayShared,
    request: Request<Incoming>,
    connection: &Connection<'_>,
) -> Result<(String, Bytes), Answered> {
    if let Some(refused) = not_ready(shared) {
        return Err(refused);
    }
    let key = idempotency_key(&request)?;
    let body = read_body(shared, request, connection).await?;
    Ok((key, body))
}

/// A JSON body as `T`, or 400 malformed_json saying what was expected.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Answered> {
    serde_json::from_slice(body).map_err(|e| {
        let message = format!("{expected}: {}", bounded_detail(&e.to_string()));
        Answered::error(StatusCode::BAD_REQUEST, "malformed_json", &message)
    })
}

/// Validates with the Usher's own decoder, appends, and waits for the certified output.
async fn submit(shared: &GatewayShared, envelope: Envelope<Inventory>) -> Answered {
    let payload = envelope.encode();
    if let Err(invalid) = Envelope::<Inventory>::decode(&payload) {
        return Answered::error(StatusCode::BAD_REQUEST, invalid.code(), &invalid.to_string());
    }
    // spec: Gateway.WaitingBound — counted from before the append, so a refusal appends nothing.
    let in_flight = shared.in_flight.fetch_add(1, Ordering::AcqRel);
    let _guard = InFlight(shared);
    if in_flight >= shared.config.max_waiting {
        return overloaded();
    }
    let submitted_at = Instant::now();
    let deadline = submitted_at + Duration::from_millis(shared.config.deadline_ms);
    let (reply, replied) = oneshot::channel();
    // spec: Gateway.MovementAppended
    match shared.appender.submit(AppendRequest { key: envelope.key.clone(), payload, reply }) {
        Ok(()) => {}
        Err(QueueError::Full) => return overloaded(),
        Err(QueueError::Stopped) => {
            return Answered::error(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", "the log appender stopped")
        }
    }
    let appended = match with_deadline(replied, deadline).await {
        Some(Ok(Ok(position))) => position,
        // spec: Gateway.LogUnavailable
        Some(Ok(Err(error))) => {
            return Answered::error(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", &bounded_detail(&error))
        }
        Some(Err(_)) => {
            return Answered::error(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", "the log appender stopped")
        }
        None => {
            return Answered::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                "the log did not acknowledge the command before the deadline; it may still be appended \
                 and applied, and a retry with the same Idempotency-Key is safe and learns the outcome",
            )
        }
    };
    let (partition, offset) = appended;
    let appended_at = Instant::now();
    shared.metrics.stage_append.observe((appended_at - submitted_at).as_secs_f64());
    let (waiter, answered) = oneshot::channel();
    let lookup = shared.view.lock().expect("not poisoned").lookup_or_wait(partition, offset, waiter);
    let answer = match lookup {
        Lookup::Ready(answer) => answer,
        Lookup::Registered => {
            // Forgets the waiter however the wait ends, the client going away included
            // (hyper then drops this future).
            let _registered = Registered { shared, partition, offset };
            match with_deadline(answered, deadline).await {
                Some(Ok(answer)) => answer,
                // spec: Gateway.DeadlinePassed
                _ => return deadline_passed(partition, offset),
            }
        }
        Lookup::Evicted => return deadline_passed(partition, offset),
        Lookup::Full(_) => return overloaded(),
    };
    shared.metrics.stage_certify.observe(appended_at.elapsed().as_secs_f64());
    render(shared, &envelope.key, &answer, offset)
}

struct Registered<'a> {
    shared: &'a GatewayShared,
    partition: u32,
    offset: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.view.lock().expect("not poisoned").cancel(self.partition, self.offset);
    }
}

struct InFlight<'a>(&'a GatewayShared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn overloaded() -> Answered {
    Answered::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "too many requests are waiting for certification; retry later with the same Idempotency-Key",
    )
}

fn deadline_passed(partition: u32, offset: u64) -> Answered {
    Answered::json(
        StatusCode::GATEWAY_TIMEOUT,
        &json!({
            "error": {
                "code": "deadline_exceeded",
                "message": "the output was not certified before the deadline; the command is in the log and \
                            will be applied once; retrying with the same Idempotency-Key is safe",
            },
            "partition": partition,
            "offset": offset,
        }),
    )
}

/// Awaits `future` until `deadline`; None when the deadline passed first.
async fn with_deadline<T>(future: impl std::future::Future<Output = T>, deadline: Instant) -> Option<T> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    futures_lite::future::or(async { Some(future.await) }, async {
        glommio::timer::sleep(remaining).await;
        None
    })
    .await
}

#[derive(Serialize)]
struct MovementAnswer {
    #[serde(flatten)]
    output: OutputJson,
    replayed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

/// The answer to the command at `offset`, from its certified output.
fn render(shared: &GatewayShared, key: &str, answer: &Answer, offset: u64) -> Answered {
    let output = match OutputJson::from_bytes(answer) {
        Ok(output) => output,
        Err(e) => {
            tracing::error!(offset, "a certified output does not decode: {e}");
            return Answered::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the certified output does not decode",
            );
        }
    };
    if output.verdict == "replay" {
        // spec: Gateway.ReplayReturnsOriginal
        let original_offset = output.original_offset.expect("a replay names its original");
        let original = shared.view.lock().expect("not poisoned").answer(output.partition, original_offset);
        if let Some(original) = original.and_then(|bytes| OutputJson::from_bytes(&bytes).ok()) {
            return movement_answer(key, original, true, Some(offset));
        }
        return movement_answer(key, output, true, Some(offset));
    }
    movement_answer(key, output, false, None)
}

fn movement_answer(key: &str, mut output: OutputJson, replayed: bool, replay_offset: Option<u64>) -> Answered {
    output.key = Some(key.to_owned());
    let (status, error) = match output.verdict {
        "accepted" | "version_activated" | "replay" => (StatusCode::OK, None),
        "rejected" => {
            let code = output.code.clone().unwrap_or_default();
            let message = format!("the movement breaks a rule: {code}");
            (StatusCode::UNPROCESSABLE_ENTITY, Some(json!({ "code": code, "message": message })))
        }
        "conflict" => (
            StatusCode::CONFLICT,
            Some(json!({
                "code": "idempotency_key_reused",
                "message": "this Idempotency-Key was used with another payload",
            })),
        ),
        "malformed" => {
            let code = output.reason.clone().unwrap_or_else(|| "invalid_command".into());
            (StatusCode::BAD_REQUEST, Some(json!({ "code": code, "message": "the command is malformed" })))
        }
        "warden_full" => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(json!({ "code": "warden_full", "message": "too many live idempotency keys; retry later" })),
        ),
        other => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(json!({ "code": "not_ready", "message": format!("unexpected verdict {other}") })),
        ),
    };
    Answered::json(status, &MovementAnswer { output, replayed, replay_offset, error })
}

/// `partition` and `sku` from a query string (names need no percent-decoding: a valid
/// one has no escapes, so an escaped one is refused as invalid).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn partition_param(shared: &GatewayShared, query: Option<&str>) -> Result<u32, Answered> {
    let Some(text) = query_param(query, "partition") else { return Ok(0) };
    match text.parse::<u32>() {
        Ok(p) if p < shared.partitions => Ok(p),
        _ => Err(Answered::error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            &format!("partition must be an integer below {}", shared.partitions),
        )),
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn invalid_name(what: &str) -> Answered {
    Answered::error(StatusCode::BAD_REQUEST, "invalid_name", &format!("{what} must be 1..=64 bytes of [A-Za-z0-9._:-]"))
}

/// The view's validity for `partition` (spec: Gateway.ViewValidFromRecovery,
/// Gateway.OverruledOffsetLeavesAGap).
fn view_not_valid(
    view: &super::certified_view::CertifiedView<oneshot::Sender<Answer>>,
    partition: u32,
) -> Option<Answered> {
    if let Some(gap) = view.gap_at(partition) {
        let message = format!(
            "offset {gap} was certified without this instance's output (it was quarantined, or its \
             Ledger lost outputs); its certified stock is rebuilt when it restarts"
        );
        return Some(Answered::error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &message));
    }
    if !view.is_valid(partition) {
        return Some(Answered::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "certification has not yet reached the state this instance recovered",
        ));
    }
    None
}

/// spec: Gateway.StockRead
fn stock_entry(shared: &GatewayShared, warehouse: &str, sku: &str, query: Option<&str>) -> Answered {
    stock_answer(shared, query, &[("warehouse", Some(warehouse)), ("sku", Some(sku))], |view, partition| {
        json!({
            "warehouse": warehouse, "sku": sku, "qty": view.level(partition, &StockKey::new(warehouse, sku)),
            "partition": partition, "certified_watermark": view.end(partition).checked_sub(1),
        })
    })
}

/// spec: Gateway.StockRead
fn stock_by_sku(shared: &GatewayShared, query: Option<&str>) -> Answered {
    let sku = query_param(query, "sku");
    stock_answer(shared, query, &[("sku", sku)], |view, partition| {
        let sku = sku.expect("checked by stock_answer");
        let levels: Vec<serde_json::Value> = view
            .levels_of_sku(partition, sku)
            .into_iter()
            .map(|(warehouse, qty)| json!({ "warehouse": warehouse, "qty": qty }))
            .collect();
        json!({
            "sku": sku, "partition": partition,
            "certified_watermark": view.end(partition).checked_sub(1), "levels": levels,
        })
    })
}

/// A stock read: readiness first, then the names (None: a missing query parameter) and the
/// partition; the view is checked and read under one lock, so a gap cannot open in between.
fn stock_answer(
    shared: &GatewayShared,
    query: Option<&str>,
    names: &[(&str, Option<&str>)],
    read: impl FnOnce(&CertifiedView<oneshot::Sender<Answer>>, u32) -> serde_json::Value,
) -> Answered {
    if let Some(refused) = not_ready(shared) {
        return refused;
    }
    for (what, name) in names {
        match name {
            None => {
                let message = format!("the {what} query parameter is required");
                return Answered::error(StatusCode::BAD_REQUEST, "invalid_query", &message);
            }
            Some(name) if !valid_name(name) => return invalid_name(what),
            Some(_) => {}
        }
    }
    let partition = match partition_param(shared, query) {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let view = shared.view.lock().expect("not poisoned");
    if let Some(refused) = view_not_valid(&view, partition) {
        return refused;
    }
    let answer = read(&view, partition);
    drop(view);
    Answered::json(StatusCode::OK, &answer)
}

/// spec: Gateway.ClusterView
fn cluster(shared: &GatewayShared) -> Answered {
    let status = shared.node.status.lock().expect("not poisoned").clone();
    let federation = status.federation.unwrap_or_default();
    let quarantined_peers: Vec<u32> =
        federation.peers.iter().filter(|p| p.quarantined).map(|p| p.instance_id).collect();
    let has_federation = !federation.clerk.is_empty();
    Answered::json(
        StatusCode::OK,
        &json!({
            "instance_id": shared.instance_id,
            "ready": shared.node.ready.load(Ordering::Acquire),
            "phase": status.phase,
            "partitions": status.partitions,
            "publisher": federation.publisher,
            "expected_copies": has_federation.then_some(federation.expected_copies),
            "faults_detected": federation.faults_total,
            "recent_faults": federation.faults,
            "self_quarantined": federation.quarantined,
            "quarantined_peers": quarantined_peers,
            "peers": federation.peers,
        }),
    )
}

fn health(shared: &GatewayShared) -> Answered {
    if shared.node.ready.load(Ordering::Acquire) {
        return Answered::json(StatusCode::OK, &json!({ "status": "ready" }));
    }
    let reason = shared.node.not_ready_reason.lock().expect("not poisoned").clone();
    Answered::json(StatusCode::SERVICE_UNAVAILABLE, &json!({ "status": "not_ready", "reason": reason }))
}

/// spec: Gateway.AdminRequiresToken
fn authorised(shared: &GatewayShared, request: &Request<Incoming>) -> Result<(), Answered> {
    let Some(token) = &shared.config.admin_token else {
        return Err(Answered::error(StatusCode::NOT_FOUND, "not_found", "no such resource"));
    };
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    // Compared through keyed digests: the time taken does not depend on where they differ.
    let key = [0x5Au8; 32];
    if blake3::keyed_hash(&key, presented.as_bytes()) == blake3::keyed_hash(&key, token.as_bytes()) {
        Ok(())
    } else {
        Err(Answered::error(StatusCode::UNAUTHORIZED, "unauthorized", "a valid admin bearer token is required"))
    }
}

async fn admin(
    shared: &GatewayShared,
    request: Request<Incoming>,
    action: &[&str],
    connection: &Connection<'_>,
) -> Answered {
    if let Err(refused) = authorised(shared, &request) {
        return refused;
    }
    match action {
        ["activate-version"] => activate_version(shared, request, connection).await,
        ["faults"] => inject_faults(shared, request, connection).await,
        ["readmit", instance] => readmit(shared, instance),
        _ => Answered::error(StatusCode::NOT_FOUND, "not_found", "no such admin resource"),
    }
}

/// `POST /v1/admin/activate-version`: submits an `activate_version` command to the log.
async fn activate_version(shared: &GatewayShared, request: Request<Incoming>, connection: &Connection<'_>) -> Answered {
    let (key, body) = match keyed_body(shared, request, connection).await {
        Ok(keyed) => keyed,
        Err(refused) => return refused,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Activate {
        version: u32,
    }
    match parse_json::<Activate>(&body, "expected {\"version\": N}") {
        // spec: Gateway.ActivateVersionThroughLog
        Ok(Activate { version }) => {
            submit(shared, Envelope::admin(key, AdminCommand::ActivateVersion { version })).await
        }
        Err(refused) => refused,
    }
}

/// `POST /v1/admin/faults`: checks and replaces the injected faults.
async fn inject_faults(shared: &GatewayShared, request: Request<Incoming>, connection: &Connection<'_>) -> Answered {
    let body = match read_body(shared, request, connection).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let faults: crate::clerk::InjectedFaults = match parse_json(&body, "expected {\"bitflip_rate\", \"delay_ms\"}") {
        Ok(faults) => faults,
        Err(refused) => return refused,
    };
    if faults.bitflip_rate.is_some_and(|r| !(r > 0.0 && r <= 1.0)) {
        return Answered::error(StatusCode::BAD_REQUEST, "invalid_command", "bitflip_rate must be in (0, 1]");
    }
    if faults.delay_ms.is_some_and(|d| d > MAX_INJECTED_DELAY_MS) {
        let message = format!("delay_ms must be at most {MAX_INJECTED_DELAY_MS}");
        return Answered::error(StatusCode::BAD_REQUEST, "invalid_command", &message);
    }
    if faults.bitflip_rate.is_some() && shared.expected_copies < 2 {
        // With one copy certifying, a flipped output would be certified and served.
        return Answered::error(
            StatusCode::BAD_REQUEST,
            "invalid_command",
            "bit flips need expected_copies of at least 2, or they would be certified",
        );
    }
    // spec: Gateway.FaultInjectionReplaced
    *shared.faults.pending.lock().expect("not poisoned") = Some(faults);
    tracing::warn!(?faults, "fault injection replaced through the admin API");
    Answered::json(StatusCode::OK, &faults)
}

/// `POST /v1/admin/readmit/{instance}`: queues the readmission of a quarantined member.
fn readmit(shared: &GatewayShared, instance: &str) -> Answered {
    let Some(instance) = instance.parse::<u32>().ok().filter(|i| shared.members.contains(i)) else {
        let message = format!("the instance must be one of the federation's ids {:?}", shared.members);
        return Answered::error(StatusCode::BAD_REQUEST, "invalid_query", &message);
    };
    // spec: Gateway.ReadmitQueued
    match crate::storage::quarantine::request_readmit(&shared.data_dir, instance) {
        Ok(()) => Answered::json(StatusCode::ACCEPTED, &json!({ "instance": instance, "queued": true })),
        Err(e) => Answered::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            &format!("the readmit request could not be written: {e:#}"),
        ),
    }
}
