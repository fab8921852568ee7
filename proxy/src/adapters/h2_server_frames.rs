//! The frames a client sends to Spur's HTTP/2 server, one handler each (RFC 9113 §6), and
//! a request made from a header block (§8.3).

use super::*;
use crate::adapters::h2_stream::reset_on;

/// A stream-level refusal of a request (§8.1.1): the request was malformed.
const MALFORMED: Reason = Reason::PROTOCOL_ERROR;

impl Conn {
    pub(super) fn data<S: StreamLike>(
        &mut self,
        head: Head,
        payload: Bytes,
        streams: &mut StreamSet<S>,
    ) -> ConnResult {
        if head.stream == 0 {
            return Err((Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if head.stream > self.last_id || head.stream % 2 == 0 {
            return Err((Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        // The whole frame counts against the windows, padding included (§6.9.1).
        let counted = head.len as i64;
        self.recv_window -= counted;
        if self.recv_window < 0 {
            return Err((
                Reason::FLOW_CONTROL_ERROR,
                "DATA over the connection window",
            ));
        }
        let data = match frame::unpad(head.flags, &payload) {
            Ok(d) => payload.slice_ref(d),
            Err(r) => return Err((r, "bad DATA padding")),
        };
        let end = head.flags & frame::END_STREAM != 0;
        let Some(slot) = self.out.slot_of(head.stream) else {
            // A stream that has ended: its window comes back at once. Unless the server
            // reset it (the client may not have seen that yet), the client is told.
            self.recv_unacked += head.len;
            if !self.out.was_reset(head.stream) {
                frame::put_rst(&mut self.out.buf, head.stream, Reason::STREAM_CLOSED);
            }
            return Ok(());
        };
        let meta = self.out.meta[slot]
            .as_mut()
            .expect("an open stream has its state");
        let Some(feed) = &meta.feed else {
            // The client had ended its side of the stream already.
            self.recv_unacked += head.len;
            reset_on(
                &mut self.out.buf,
                &mut self.out.reset_ids,
                head.stream,
                Reason::STREAM_CLOSED,
            );
            meta.reset = true;
            streams.wake(slot);
            return Ok(());
        };
        meta.recv_window -= counted;
        if meta.recv_window < 0 {
            self.refuse_body(slot, Reason::FLOW_CONTROL_ERROR, head.len, streams);
            return Ok(());
        }
        // Padding is given back now; the data, as it is read.
        self.recv_unacked += head.len - data.len();
        meta.recv_unacked += head.len - data.len();
        let over = match &mut meta.expect {
            Some(left) => {
                let over = data.len() as u64 > *left || (end && data.len() as u64 != *left);
                *left = left.saturating_sub(data.len() as u64);
                over
            }
            None => false,
        };
        if over {
            // The body does not match its content-length: malformed (§8.1.1).
            self.refuse_body(slot, MALFORMED, data.len(), streams);
            return Ok(());
        }
        let n = data.len();
        if !data.is_empty() && !feed.data(data) {
            self.recv_unacked += n;
        }
        if end {
            feed.end(None);
            meta.feed = None;
        }
        Ok(())
    }

    /// Resets a stream whose request body broke the rules, giving `unread` bytes back
    /// to the connection's window.
    fn refuse_body<S: StreamLike>(
        &mut self,
        slot: usize,
        reason: Reason,
        unread: usize,
        streams: &mut StreamSet<S>,
    ) {
        let meta = self.out.meta[slot]
            .as_mut()
            .expect("an open stream has its state");
        reset_on(&mut self.out.buf, &mut self.out.reset_ids, meta.id, reason);
        if let Some(feed) = meta.feed.take() {
            feed.reset(reason);
        }
        meta.reset = true;
        self.recv_unacked += unread;
        self.resets += 1;
        streams.wake(slot);
    }

    pub(super) fn headers<S, MK>(
        &mut self,
        head: Head,
        payload: &[u8],
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> ConnResult
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        if head.stream == 0 {
            return Err((Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let mut block =
            frame::unpad(head.flags, payload).map_err(|r| (r, "bad HEADERS padding"))?;
        if head.flags & frame::PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return Err((
                    Reason::FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority",
                ));
            }
            block = &block[5..];
        }
        let end_stream = head.flags & frame::END_STREAM != 0;
        if head.flags & frame::END_HEADERS != 0 {
            return self.header_block(head.stream, end_stream, block, streams, make);
        }
        self.gathering = Some(Gathering {
            stream: head.stream,
            end_stream,
            block: block.to_vec(),
        });
        Ok(())
    }

    pub(super) fn continuation<S, MK>(
        &mut self,
        head: Head,
        payload: &[u8],
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> ConnResult
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        let Some(g) = &mut self.gathering else {
            return Err((Reason::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        };
        if g.stream != head.stream {
            return Err((Reason::PROTOCOL_ERROR, "CONTINUATION on another stream"));
        }
        // A block can only grow so far before it is decoded (the table must stay in step,
        // so it is decoded whole): past twice the header list limit, the client is
        // flooding (CVE-2024-27316 was this, against servers that kept gathering).
        if g.block.len() + payload.len() > 2 * self.max_header_list {
            return Err((Reason::ENHANCE_YOUR_CALM, "header block too large"));
        }
        g.block.extend_from_slice(payload);
        if head.flags & frame::END_HEADERS == 0 {
            return Ok(());
        }
        let g = self.gathering.take().expect("checked above");
        self.header_block(g.stream, g.end_stream, &g.block, streams, make)
    }

    pub(super) fn rst_stream<S: StreamLike>(
        &mut self,
        head: Head,
        payload: &[u8],
        streams: &mut StreamSet<S>,
    ) -> ConnResult {
        if head.stream == 0 {
            return Err((Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err((Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"));
        }
        if head.stream > self.last_id {
            return Err((Reason::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
        }
        let reason = Reason::from(u32::from_be_bytes([
            payload[0], payload[1], payload[2], payload[3],
        ]));
        let Some(slot) = self.out.slot_of(head.stream) else {
            return Ok(());
        };
        let meta = self.out.meta[slot]
            .as_mut()
            .expect("an open stream has its state");
        if let Some(feed) = meta.feed.take() {
            feed.reset(reason);
        }
        if !meta.reset {
            meta.reset = true;
            self.resets += 1;
        }
        streams.wake(slot);
        Ok(())
    }

    pub(super) fn settings<S: StreamLike>(
        &mut self,
        head: Head,
        payload: &[u8],
        streams: &mut StreamSet<S>,
    ) -> ConnResult {
        if head.stream != 0 {
            return Err((Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.flags & frame::ACK != 0 {
            return match payload.is_empty() {
                true => Ok(()),
                false => Err((Reason::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")),
            };
        }
        let before = self.out.peer.initial_window;
        frame::apply_settings(&mut self.out.peer, payload).map_err(|r| (r, "bad SETTINGS"))?;
        self.settings_seen = true;
        frame::put_settings_ack(&mut self.out.buf);
        let delta = self.out.peer.initial_window - before;
        if delta == 0 {
            return Ok(());
        }
        // A new initial window moves every open stream's window by the difference (§6.9.2).
        for (_, slot) in &self.out.ids {
            if let Some(meta) = self.out.meta[*slot].as_mut() {
                meta.send_window += delta;
                if meta.send_window > frame::MAX_WINDOW {
                    return Err((Reason::FLOW_CONTROL_ERROR, "window over 2^31-1"));
                }
            }
        }
        if delta > 0 {
            for slot in self.out.blocked.drain(..) {
                streams.wake(slot);
            }
        }
        Ok(())
    }

    pub(super) fn ping(&mut self, head: Head, payload: &[u8]) -> ConnResult {
        if head.stream != 0 {
            return Err((Reason::PROTOCOL_ERROR, "PING on a stream"));
        }
        if payload.len() != 8 {
            return Err((Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
        }
        if head.flags & frame::ACK == 0 {
            frame::put_ping_ack(&mut self.out.buf, payload);
        }
        Ok(())
    }

    pub(super) fn goaway(&mut self, head: Head, payload: &[u8]) -> ConnResult {
        if head.stream != 0 {
            return Err((Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
        }
        if payload.len() < 8 {
            return Err((Reason::FRAME_SIZE_ERROR, "GOAWAY under 8 bytes"));
        }
        let reason = Reason::from(u32::from_be_bytes([
            payload[4], payload[5], payload[6], payload[7],
        ]));
        if reason != Reason::NO_ERROR {
            tracing::debug!(?reason, "HTTP/2 client went away with an error");
        }
        // The streams in progress finish; no new ones come.
        self.go_away(Reason::NO_ERROR);
        Ok(())
    }

    pub(super) fn window_update<S: StreamLike>(
        &mut self,
        head: Head,
        payload: &[u8],
        streams: &mut StreamSet<S>,
    ) -> ConnResult {
        if payload.len() != 4 {
            return Err((Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes"));
        }
        let inc = i64::from(frame::u31(payload));
        if head.stream == 0 {
            if inc == 0 {
                return Err((Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.out.send_window += inc;
            if self.out.send_window > frame::MAX_WINDOW {
                return Err((Reason::FLOW_CONTROL_ERROR, "connection window over 2^31-1"));
            }
            for slot in self.out.blocked.drain(..) {
                streams.wake(slot);
            }
            return Ok(());
        }
        if head.stream > self.last_id {
            return Err((Reason::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"));
        }
        let Some(slot) = self.out.slot_of(head.stream) else {
            return Ok(());
        };
        let meta = self.out.meta[slot]
            .as_mut()
            .expect("an open stream has its state");
        let reason = match inc {
            0 => Reason::PROTOCOL_ERROR,
            _ if meta.send_window + inc > frame::MAX_WINDOW => Reason::FLOW_CONTROL_ERROR,
            _ => {
                meta.send_window += inc;
                if let Some(at) = self.out.blocked.iter().position(|s| *s == slot) {
                    self.out.blocked.swap_remove(at);
                    streams.wake(slot);
                }
                return Ok(());
            }
        };
        reset_on(
            &mut self.out.buf,
            &mut self.out.reset_ids,
            head.stream,
            reason,
        );
        if let Some(feed) = meta.feed.take() {
            feed.reset(reason);
        }
        meta.reset = true;
        self.resets += 1;
        streams.wake(slot);
        Ok(())
    }
}

impl Conn {
    /// A whole header block: a new request, or the trailers of a request body.
    pub(super) fn header_block<S, MK>(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> ConnResult
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        if id % 2 == 0 {
            return Err((Reason::PROTOCOL_ERROR, "a client stream with an even id"));
        }
        if id <= self.last_id {
            return self.trailers(id, end_stream, block, streams);
        }
        self.last_id = id;
        let mut head = RequestHead::default();
        let decoded = self
            .decoder
            .decode(block, self.max_header_list, &mut |f| head.field(f))
            .map_err(|_| (Reason::COMPRESSION_ERROR, "bad HPACK block"))?;
        if self.going_away || self.out.ids.len() >= MAX_CONCURRENT_STREAMS as usize {
            self.out.reset(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if decoded.too_large {
            too_large(&mut self.out, id);
            if !end_stream {
                // Answered: the client may stop sending its body (§8.1).
                self.out.reset(id, Reason::NO_ERROR);
            }
            return Ok(());
        }
        let length = head.content_length();
        let request = match (decoded.malformed, length) {
            (false, Ok(length)) if !(end_stream && length.unwrap_or(0) > 0) => head.into_request(),
            _ => None,
        };
        let (Some(mut request), Ok(expect)) = (request, length) else {
            self.out.reset(id, MALFORMED);
            self.resets += 1;
            return Ok(());
        };
        let feed = match end_stream {
            true => None,
            false => {
                let (feed, recv) = h2_body::channel(id, &self.credits, expect);
                *request.body_mut() = InBody::H2(recv);
                Some(feed)
            }
        };
        let slot = streams.push_with(|| make(request));
        let meta = Meta {
            id,
            send_window: self.out.peer.initial_window,
            recv_window: i64::from(WINDOW),
            recv_unacked: 0,
            feed,
            expect,
            reset: false,
        };
        self.out.open(slot, meta);
        Ok(())
    }

    /// A header block on a stream already opened: the request body's trailers, if the
    /// stream is open and the block ends it.
    fn trailers<S: StreamLike>(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
        streams: &mut StreamSet<S>,
    ) -> ConnResult {
        let mut trailers = HeaderMap::new();
        let mut pseudo = false;
        // Decoded whatever becomes of it: the table must stay in step with the client's.
        let decoded = self
            .decoder
            .decode(block, self.max_header_list, &mut |f| match f {
                Field::Pseudo(..) => pseudo = true,
                Field::Header(name, value) => {
                    trailers.append(name, value);
                }
            })
            .map_err(|_| (Reason::COMPRESSION_ERROR, "bad HPACK block"))?;
        let Some(slot) = self.out.slot_of(id) else {
            // What the client sends on a stream the server reset is dropped; a stream it
            // never opened, or had ended, gets no more headers (§5.1.1).
            return match self.out.was_reset(id) {
                true => Ok(()),
                false => Err((Reason::PROTOCOL_ERROR, "HEADERS on a closed stream")),
            };
        };
        let meta = self.out.meta[slot]
            .as_mut()
            .expect("an open stream has its state");
        let Some(feed) = meta.feed.take() else {
            reset_on(
                &mut self.out.buf,
                &mut self.out.reset_ids,
                id,
                Reason::STREAM_CLOSED,
            );
            meta.reset = true;
            streams.wake(slot);
            return Ok(());
        };
        let complete = matches!(meta.expect, None | Some(0));
        if !end_stream || pseudo || decoded.malformed || decoded.too_large || !complete {
            reset_on(&mut self.out.buf, &mut self.out.reset_ids, id, MALFORMED);
            feed.reset(MALFORMED);
            meta.reset = true;
            self.resets += 1;
            streams.wake(slot);
            return Ok(());
        }
        feed.end(Some(trailers));
        Ok(())
    }
}

/// A head too large even for the room given over the listener's limit: 431, as the
/// request path answers one over the limit.
fn too_large(out: &mut Out, id: u32) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-spur-error",
        http::HeaderValue::from_static("headers_too_large"),
    );
    headers.insert("x-request-id", crate::policy::correlation::new_request_id());
    headers.insert(http::header::DATE, crate::headers::http_date());
    let status = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    frame::put_headers(&mut out.buf, id, true, out.peer.max_frame, |dst| {
        hpack::encode_response(status, &headers, dst)
    });
}

/// A request's head as its fields are decoded.
#[derive(Default)]
struct RequestHead {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    headers: Option<HeaderMap>,
    malformed: bool,
}

impl RequestHead {
    fn field(&mut self, f: Field) {
        match f {
            Field::Pseudo(p, value) => {
                let place = match p {
                    // Pseudo-headers come first (§8.3).
                    _ if self.headers.is_some() => None,
                    Pseudo::Method => Some(&mut self.method),
                    Pseudo::Scheme => Some(&mut self.scheme),
                    Pseudo::Authority => Some(&mut self.authority),
                    Pseudo::Path => Some(&mut self.path),
                    // Extended CONNECT is not offered; `:status` is a response's.
                    Pseudo::Protocol | Pseudo::Status => None,
                };
                match place {
                    Some(place @ None) => *place = Some(value),
                    _ => self.malformed = true,
                }
            }
            Field::Header(name, value) => {
                let headers = self
                    .headers
                    .get_or_insert_with(|| HeaderMap::with_capacity(12));
                if connection_specific(&name, &value) {
                    self.malformed = true;
                    return;
                }
                headers.append(name, value);
            }
        }
    }

    /// The declared `content-length`: an error when it is not one number.
    fn content_length(&self) -> Result<Option<u64>, ()> {
        let Some(headers) = &self.headers else {
            return Ok(None);
        };
        let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        let n = std::str::from_utf8(first.as_bytes())
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(())?;
        match values.all(|v| v == first) {
            true => Ok(Some(n)),
            false => Err(()),
        }
    }

    /// The request, or `None` when its pseudo-headers do not make one (§8.3.1).
    fn into_request(self) -> Option<Request<InBody>> {
        if self.malformed {
            return None;
        }
        let method = Method::from_bytes(&self.method?).ok()?;
        let connect = method == Method::CONNECT;
        let mut parts = http::uri::Parts::default();
        if let Some(a) = self.authority {
            parts.authority = Some(http::uri::Authority::from_maybe_shared(a).ok()?);
        }
        match (self.scheme, connect) {
            (Some(_), true) => return None,
            (Some(s), false) => {
                let scheme = http::uri::Scheme::try_from(&s[..]).ok()?;
                // A URI cannot have a scheme without an authority: the scheme was checked.
                if parts.authority.is_some() {
                    parts.scheme = Some(scheme);
                }
            }
            (None, true) if parts.authority.is_some() => {}
            (None, _) => return None,
        }
        match (self.path, connect) {
            (Some(_), true) => return None,
            (Some(p), false) if !p.is_empty() => {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_maybe_shared(p).ok()?)
            }
            (None, true) => {}
            _ => return None,
        }
        let mut req = Request::new(InBody::Empty);
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_parts(parts).ok()?;
        *req.version_mut() = Version::HTTP_2;
        if let Some(headers) = self.headers {
            *req.headers_mut() = headers;
        }
        Some(req)
    }
}

/// A header HTTP/2 forbids in a request (§8.2.2): connection-specific ones, and `te` with
/// anything but `trailers`.
fn connection_specific(name: &http::HeaderName, value: &http::HeaderValue) -> bool {
    use http::header;
    if name == header::TE {
        return value != "trailers";
    }
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}
