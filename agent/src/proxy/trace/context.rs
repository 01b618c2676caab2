//! Trace context propagation: reading W3C `traceparent`/`tracestate` and B3 (single
//! `b3` header or multiple `x-b3-*` headers) from a request, and writing them back for
//! the next hop in the format the client used. Parsing is pure and never panics: a
//! malformed header is ignored, as if it were absent.

use http::{HeaderMap, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// How a trace context arrived, so it leaves in the same format: W3C `traceparent` is
/// always written, and the B3 flavour the client used beside it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// W3C Trace Context only (also what a new trace starts as).
    #[default]
    W3c,
    /// B3's single header, `b3: {trace id}-{span id}-{sampled}-{parent span id}`.
    B3Single,
    /// B3's multiple headers, `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`,
    /// `x-b3-sampled` (and `x-b3-flags`).
    B3Multi,
}

/// The position of a request in a trace: which trace, which span is its parent, and
/// whether the trace is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// Never all zero.
    pub trace_id: [u8; 16],
    /// The span the next hop's span is a child of; never all zero.
    pub span_id: [u8; 8],
    /// That span's own parent, which B3 carries (`x-b3-parentspanid`) and W3C does not.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    /// B3 without a sampling decision leaves it to the receiver: the tracer then draws
    /// one as for a new trace (and `sampled` is false until it has).
    pub deferred: bool,
    /// The vendors' W3C `tracestate`, carried along unchanged.
    pub tracestate: Option<HeaderValue>,
    pub format: Format,
}

/// The trace context of a request: W3C `traceparent` (with `tracestate`) first, else
/// B3's single header, else its multiple headers; `None` when none is there and valid.
impl TraceContext {
    /// The trace id as W3C writes it, for logs.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

pub fn extract(headers: &HeaderMap) -> Option<TraceContext> {
    if let Some(mut context) = only(headers, &TRACEPARENT).and_then(parse_traceparent) {
        context.tracestate = tracestate(headers);
        // A client that sends B3 beside W3C for the same trace reads B3 too.
        let b3 = b3_single(headers)
            .map(|b3| (b3, Format::B3Single))
            .or_else(|| b3_multi(headers).map(|b3| (b3, Format::B3Multi)));
        if let Some((b3, format)) = b3
            && b3.trace_id == context.trace_id
        {
            context.format = format;
            context.parent_span_id = b3.parent_span_id;
        }
        return Some(context);
    }
    b3_single(headers)
        .map(|context| TraceContext {
            format: Format::B3Single,
            ..context
        })
        .or_else(|| {
            b3_multi(headers).map(|context| TraceContext {
                format: Format::B3Multi,
                ..context
            })
        })
}

/// Writes `context` for the next hop: `traceparent` (and `tracestate` if any), and the
/// B3 headers if the context came as B3, replacing any trace headers already there.
pub fn inject(context: &TraceContext, headers: &mut HeaderMap) {
    for name in [
        &TRACEPARENT,
        &TRACESTATE,
        &B3,
        &B3_TRACE_ID,
        &B3_SPAN_ID,
        &B3_PARENT_SPAN_ID,
        &B3_SAMPLED,
        &B3_FLAGS,
    ] {
        headers.remove(name);
    }
    let trace_id = hex(&context.trace_id);
    let span_id = hex(&context.span_id);
    let flags = if context.sampled { "01" } else { "00" };
    headers.insert(
        TRACEPARENT,
        value(format!("00-{trace_id}-{span_id}-{flags}")),
    );
    if let Some(tracestate) = &context.tracestate {
        headers.insert(TRACESTATE, tracestate.clone());
    }
    let sampled = (!context.deferred).then_some(if context.sampled { "1" } else { "0" });
    let parent = context.parent_span_id.as_ref().map(|parent| hex(parent));
    match context.format {
        Format::W3c => {}
        Format::B3Single => {
            let mut b3 = format!("{trace_id}-{span_id}");
            // The parent span id may only follow a sampling decision.
            if let Some(sampled) = sampled {
                b3 = format!("{b3}-{sampled}");
                if let Some(parent) = &parent {
                    b3 = format!("{b3}-{parent}");
                }
            }
            headers.insert(B3, value(b3));
        }
        Format::B3Multi => {
            headers.insert(B3_TRACE_ID, value(trace_id));
            headers.insert(B3_SPAN_ID, value(span_id));
            if let Some(parent) = parent {
                headers.insert(B3_PARENT_SPAN_ID, value(parent));
            }
            if let Some(sampled) = sampled {
                headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
            }
        }
    }
}

/// A header's text if it is there exactly once.
fn only<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values
        .next()
        .is_none()
        .then(|| first.to_str().ok())
        .flatten()
}

/// `traceparent` as W3C Trace Context level 1 reads it: `00-{32 hex trace id}-{16 hex
/// parent id}-{2 hex flags}`; a later version may append `-…` fields, which are
/// ignored; version `ff` is invalid.
fn parse_traceparent(text: &str) -> Option<TraceContext> {
    let text = text.trim_matches([' ', '\t']);
    let version: [u8; 1] = decode(text.get(..2)?)?;
    if version[0] == 0xff || text.get(2..3)? != "-" {
        return None;
    }
    let known = text.get(..55)?;
    let rest = &text[55..];
    match version[0] {
        0 if !rest.is_empty() => return None,
        _ if !rest.is_empty() && !rest.starts_with('-') => return None,
        _ => {}
    }
    let mut fields = known[3..].split('-');
    let trace_id = decode(fields.next()?).filter(nonzero)?;
    let span_id = decode(fields.next()?).filter(nonzero)?;
    let [flags] = decode(fields.next()?)?;
    Some(TraceContext {
        trace_id,
        span_id,
        parent_span_id: None,
        sampled: flags & 1 == 1,
        deferred: false,
        tracestate: None,
        format: Format::W3c,
    })
}

/// Every `tracestate` header joined with commas, as W3C allows it to be split.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let parts: Vec<&str> = headers
        .get_all(&TRACESTATE)
        .iter()
        .map(|value| value.to_str().map(str::trim))
        .collect::<Result<_, _>>()
        .ok()?;
    let joined = parts
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    (!joined.is_empty())
        .then(|| HeaderValue::try_from(joined).ok())
        .flatten()
}

/// `b3: {trace id}-{span id}[-{sampled}[-{parent span id}]]`; the header with only a
/// sampling decision (`b3: 0`) carries no context.
fn b3_single(headers: &HeaderMap) -> Option<TraceContext> {
    let mut fields = only(headers, &B3)?.trim().split('-');
    let trace_id = b3_trace_id(fields.next()?)?;
    let span_id = decode(fields.next()?).filter(nonzero)?;
    let sampling = match fields.next() {
        None => None,
        Some("0") => Some(false),
        Some("1" | "d") => Some(true),
        Some(_) => return None,
    };
    let parent_span_id = match fields.next() {
        None => None,
        Some(parent) => Some(decode(parent).filter(nonzero)?),
    };
    if fields.next().is_some() {
        return None;
    }
    Some(b3_context(trace_id, span_id, parent_span_id, sampling))
}

/// `x-b3-traceid`, `x-b3-spanid`, optional `x-b3-parentspanid`, `x-b3-sampled` (`1`,
/// `0`, or the older `true`, `false`) and `x-b3-flags` (`1` is debug: sampled).
fn b3_multi(headers: &HeaderMap) -> Option<TraceContext> {
    let trace_id = b3_trace_id(only(headers, &B3_TRACE_ID)?.trim())?;
    let span_id = decode(only(headers, &B3_SPAN_ID)?.trim()).filter(nonzero)?;
    let parent_span_id = match headers.get(&B3_PARENT_SPAN_ID) {
        None => None,
        Some(_) => Some(decode(only(headers, &B3_PARENT_SPAN_ID)?.trim()).filter(nonzero)?),
    };
    let debug = only(headers, &B3_FLAGS).is_some_and(|flags| flags.trim() == "1");
    let sampling = match only(headers, &B3_SAMPLED).map(str::trim) {
        _ if debug => Some(true),
        None => None,
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        Some(_) => return None,
    };
    Some(b3_context(trace_id, span_id, parent_span_id, sampling))
}

fn b3_context(
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    sampling: Option<bool>,
) -> TraceContext {
    TraceContext {
        trace_id,
        span_id,
        parent_span_id,
        sampled: sampling == Some(true),
        deferred: sampling.is_none(),
        tracestate: None,
        format: Format::W3c,
    }
}

/// A B3 trace id: 32 hex digits, or 16, left-padded with zeros to 128 bits.
fn b3_trace_id(text: &str) -> Option<[u8; 16]> {
    let trace_id = match text.len() {
        32 => decode(text)?,
        16 => {
            let low: [u8; 8] = decode(text)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    nonzero(&trace_id).then_some(trace_id)
}

fn nonzero<const N: usize>(id: &[u8; N]) -> bool {
    id.iter().any(|byte| *byte != 0)
}

/// Exactly `2 * N` lowercase hex digits, as both W3C and B3 write ids.
fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

/// Lowercase hex, as W3C and B3 write ids (and OTLP's JSON does).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|byte| {
            [
                DIGITS[usize::from(byte >> 4)],
                DIGITS[usize::from(byte & 15)],
            ]
        })
        .map(char::from)
        .collect()
}

/// A header value of hex digits and dashes, which is always valid.
fn value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("hex digits and dashes make a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    const PARENT: &str = "05e3ac9a4f6e3b90";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        map
    }

    fn id<const N: usize>(text: &str) -> [u8; N] {
        decode(text).unwrap()
    }

    /// (trace id, span id, parent span id, sampled, deferred, format) of what `extract`
    /// found, in hex.
    type Found = (String, String, Option<String>, bool, bool, Format);

    /// Request headers, as (name, value) pairs.
    type Pairs<'a> = Vec<(&'a str, String)>;

    fn found(context: &TraceContext) -> Found {
        (
            hex(&context.trace_id),
            hex(&context.span_id),
            context.parent_span_id.as_ref().map(|id| hex(id)),
            context.sampled,
            context.deferred,
            context.format,
        )
    }

    fn expect(
        trace: &str,
        span: &str,
        parent: Option<&str>,
        sampled: bool,
        deferred: bool,
        format: Format,
    ) -> Option<Found> {
        Some((
            trace.to_owned(),
            span.to_owned(),
            parent.map(str::to_owned),
            sampled,
            deferred,
            format,
        ))
    }

    #[test]
    fn extract_reads_w3c_then_b3_single_then_b3_multi_and_ignores_what_is_malformed() {
        let traceparent = format!("00-{TRACE}-{SPAN}-01");
        let padded = format!("0000000000000000{}", &TRACE[16..]);
        let zero_trace = "0".repeat(32);
        let zero_span = "0".repeat(16);
        let cases: Vec<(&str, Pairs, Option<Found>)> = vec![
            ("no headers", vec![], None),
            (
                "w3c sampled",
                vec![("traceparent", traceparent.clone())],
                expect(TRACE, SPAN, None, true, false, Format::W3c),
            ),
            (
                "w3c not sampled, other flag bits ignored",
                vec![("traceparent", format!("00-{TRACE}-{SPAN}-02"))],
                expect(TRACE, SPAN, None, false, false, Format::W3c),
            ),
            (
                "w3c future version with more fields",
                vec![("traceparent", format!("cc-{TRACE}-{SPAN}-01-what-next"))],
                expect(TRACE, SPAN, None, true, false, Format::W3c),
            ),
            (
                "w3c future version glued to more text",
                vec![("traceparent", format!("cc-{TRACE}-{SPAN}-01x"))],
                None,
            ),
            (
                "w3c version 00 with more fields",
                vec![("traceparent", format!("00-{TRACE}-{SPAN}-01-00"))],
                None,
            ),
            (
                "w3c version ff",
                vec![("traceparent", format!("ff-{TRACE}-{SPAN}-01"))],
                None,
            ),
            (
                "w3c uppercase hex",
                vec![(
                    "traceparent",
                    format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
                )],
                None,
            ),
            (
                "w3c zero trace id",
                vec![("traceparent", format!("00-{zero_trace}-{SPAN}-01"))],
                None,
            ),
            (
                "w3c zero parent id",
                vec![("traceparent", format!("00-{TRACE}-{zero_span}-01"))],
                None,
            ),
            (
                "w3c short trace id",
                vec![("traceparent", format!("00-{}-{SPAN}-01", &TRACE[1..]))],
                None,
            ),
            (
                "w3c bad hex",
                vec![("traceparent", format!("00-{TRACE}-{}g-01", &SPAN[1..]))],
                None,
            ),
            (
                "w3c wrong separators",
                vec![("traceparent", format!("00_{TRACE}_{SPAN}_01"))],
                None,
            ),
            (
                "w3c twice",
                vec![
                    ("traceparent", traceparent.clone()),
                    ("traceparent", traceparent.clone()),
                ],
                None,
            ),
            (
                "w3c garbage",
                vec![("traceparent", "00-ü".to_owned())],
                None,
            ),
            (
                "b3 single with sampling and parent",
                vec![("b3", format!("{TRACE}-{SPAN}-1-{PARENT}"))],
                expect(TRACE, SPAN, Some(PARENT), true, false, Format::B3Single),
            ),
            (
                "b3 single not sampled",
                vec![("b3", format!("{TRACE}-{SPAN}-0"))],
                expect(TRACE, SPAN, None, false, false, Format::B3Single),
            ),
            (
                "b3 single debug",
                vec![("b3", format!("{TRACE}-{SPAN}-d"))],
                expect(TRACE, SPAN, None, true, false, Format::B3Single),
            ),
            (
                "b3 single deferred",
                vec![("b3", format!("{TRACE}-{SPAN}"))],
                expect(TRACE, SPAN, None, false, true, Format::B3Single),
            ),
            (
                "b3 single 64-bit trace id",
                vec![("b3", format!("{}-{SPAN}-1", &TRACE[16..]))],
                expect(&padded, SPAN, None, true, false, Format::B3Single),
            ),
            (
                "b3 single sampling only",
                vec![("b3", "1".to_owned())],
                None,
            ),
            (
                "b3 single bad sampling",
                vec![("b3", format!("{TRACE}-{SPAN}-2"))],
                None,
            ),
            (
                "b3 single bad parent",
                vec![("b3", format!("{TRACE}-{SPAN}-1-{zero_span}"))],
                None,
            ),
            (
                "b3 single too many fields",
                vec![("b3", format!("{TRACE}-{SPAN}-1-{PARENT}-1"))],
                None,
            ),
            (
                "b3 single 48-bit trace id",
                vec![("b3", format!("{}-{SPAN}", &TRACE[20..]))],
                None,
            ),
            (
                "b3 single zero trace id",
                vec![("b3", format!("{zero_span}-{SPAN}"))],
                None,
            ),
            (
                "b3 multi",
                vec![
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                    ("x-b3-parentspanid", PARENT.to_owned()),
                    ("x-b3-sampled", "1".to_owned()),
                ],
                expect(TRACE, SPAN, Some(PARENT), true, false, Format::B3Multi),
            ),
            (
                "b3 multi 64-bit, legacy false",
                vec![
                    ("x-b3-traceid", TRACE[16..].to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                    ("x-b3-sampled", "false".to_owned()),
                ],
                expect(&padded, SPAN, None, false, false, Format::B3Multi),
            ),
            (
                "b3 multi debug flag",
                vec![
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                    ("x-b3-flags", "1".to_owned()),
                ],
                expect(TRACE, SPAN, None, true, false, Format::B3Multi),
            ),
            (
                "b3 multi deferred",
                vec![
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                ],
                expect(TRACE, SPAN, None, false, true, Format::B3Multi),
            ),
            (
                "b3 multi without span id",
                vec![("x-b3-traceid", TRACE.to_owned())],
                None,
            ),
            (
                "b3 multi bad parent",
                vec![
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                    ("x-b3-parentspanid", "xyz".to_owned()),
                ],
                None,
            ),
            (
                "b3 multi bad sampled",
                vec![
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                    ("x-b3-sampled", "yes".to_owned()),
                ],
                None,
            ),
            (
                "w3c wins over b3 of another trace",
                vec![
                    ("traceparent", traceparent.clone()),
                    ("b3", format!("{}-{PARENT}-0", &TRACE[16..])),
                ],
                expect(TRACE, SPAN, None, true, false, Format::W3c),
            ),
            (
                "w3c with b3 single of the same trace keeps writing b3",
                vec![
                    ("traceparent", traceparent.clone()),
                    ("b3", format!("{TRACE}-{SPAN}-1-{PARENT}")),
                ],
                expect(TRACE, SPAN, Some(PARENT), true, false, Format::B3Single),
            ),
            (
                "w3c with b3 multi of the same trace",
                vec![
                    ("traceparent", traceparent.clone()),
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                ],
                expect(TRACE, SPAN, None, true, false, Format::B3Multi),
            ),
            (
                "invalid w3c falls back to b3",
                vec![
                    ("traceparent", "00-nonsense".to_owned()),
                    ("b3", format!("{TRACE}-{PARENT}-0")),
                ],
                expect(TRACE, PARENT, None, false, false, Format::B3Single),
            ),
            (
                "b3 single wins over b3 multi",
                vec![
                    ("b3", format!("{TRACE}-{SPAN}-1")),
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", PARENT.to_owned()),
                ],
                expect(TRACE, SPAN, None, true, false, Format::B3Single),
            ),
            (
                "invalid b3 single falls back to b3 multi",
                vec![
                    ("b3", "garbage".to_owned()),
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", PARENT.to_owned()),
                    ("x-b3-sampled", "0".to_owned()),
                ],
                expect(TRACE, PARENT, None, false, false, Format::B3Multi),
            ),
        ];
        for (name, pairs, expected) in cases {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let context = extract(&headers(&pairs));
            assert_eq!(context.as_ref().map(found), expected, "{name}");
        }
    }

    #[test]
    fn tracestate_comes_along_with_a_valid_traceparent_only() {
        let traceparent = format!("00-{TRACE}-{SPAN}-01");
        let context = extract(&headers(&[
            ("traceparent", &traceparent),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", " rojo=00f067aa0ba902b7 "),
        ]))
        .unwrap();
        assert_eq!(
            context.tracestate.unwrap(),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        let context = extract(&headers(&[
            ("traceparent", &traceparent),
            ("tracestate", ""),
        ]));
        assert_eq!(context.unwrap().tracestate, None);
        let b3 = format!("{TRACE}-{SPAN}-1");
        let context = extract(&headers(&[
            ("b3", &b3),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        assert_eq!(context.unwrap().tracestate, None);
    }

    fn context(format: Format, sampled: bool, deferred: bool, parent: bool) -> TraceContext {
        TraceContext {
            trace_id: id(TRACE),
            span_id: id(SPAN),
            parent_span_id: parent.then(|| id(PARENT)),
            sampled,
            deferred,
            tracestate: None,
            format,
        }
    }

    #[test]
    fn inject_writes_w3c_and_the_b3_flavour_the_context_came_in() {
        let w3c = format!("00-{TRACE}-{SPAN}-01");
        let cases: Vec<(&str, TraceContext, Pairs)> = vec![
            (
                "w3c",
                context(Format::W3c, true, false, true),
                vec![("traceparent", w3c.clone())],
            ),
            (
                "w3c not sampled",
                context(Format::W3c, false, false, false),
                vec![("traceparent", format!("00-{TRACE}-{SPAN}-00"))],
            ),
            (
                "b3 single with parent",
                context(Format::B3Single, true, false, true),
                vec![
                    ("traceparent", w3c.clone()),
                    ("b3", format!("{TRACE}-{SPAN}-1-{PARENT}")),
                ],
            ),
            (
                "b3 single deferred drops the parent",
                context(Format::B3Single, false, true, true),
                vec![
                    ("traceparent", format!("00-{TRACE}-{SPAN}-00")),
                    ("b3", format!("{TRACE}-{SPAN}")),
                ],
            ),
            (
                "b3 multi",
                context(Format::B3Multi, false, false, true),
                vec![
                    ("traceparent", format!("00-{TRACE}-{SPAN}-00")),
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                    ("x-b3-parentspanid", PARENT.to_owned()),
                    ("x-b3-sampled", "0".to_owned()),
                ],
            ),
            (
                "b3 multi deferred, no parent",
                context(Format::B3Multi, false, true, false),
                vec![
                    ("traceparent", format!("00-{TRACE}-{SPAN}-00")),
                    ("x-b3-traceid", TRACE.to_owned()),
                    ("x-b3-spanid", SPAN.to_owned()),
                ],
            ),
        ];
        for (name, context, expected) in cases {
            let mut map = headers(&[
                ("traceparent", "00-old"),
                ("tracestate", "old=1"),
                ("b3", "old"),
                ("x-b3-traceid", "old"),
                ("x-b3-spanid", "old"),
                ("x-b3-parentspanid", "old"),
                ("x-b3-sampled", "old"),
                ("x-b3-flags", "1"),
                ("content-type", "text/plain"),
            ]);
            inject(&context, &mut map);
            let mut written: Vec<(String, String)> = map
                .iter()
                .filter(|(name, _)| *name != "content-type")
                .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
                .collect();
            written.sort();
            let mut expected: Vec<(String, String)> = expected
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect();
            expected.sort();
            assert_eq!(written, expected, "{name}");
            assert_eq!(map["content-type"], "text/plain", "{name}");
            // What was written reads back as the same trace, span, decision and format
            // (W3C, read first, knows no deferred decision).
            let back = extract(&map).unwrap();
            assert_eq!(
                (back.trace_id, back.span_id, back.sampled, back.format),
                (
                    context.trace_id,
                    context.span_id,
                    context.sampled,
                    context.format
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn inject_carries_tracestate() {
        let mut context = context(Format::W3c, true, false, false);
        context.tracestate = Some(HeaderValue::from_static("congo=t61rcWkgMzE"));
        let mut map = HeaderMap::new();
        inject(&context, &mut map);
        assert_eq!(map["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(extract(&map), Some(context));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(decode::<4>("000fa5ff"), Some([0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(decode::<2>("00fA"), None);
        assert_eq!(decode::<2>("00f"), None);
        assert_eq!(decode::<1>("é"), None);
    }
}
