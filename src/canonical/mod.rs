//! Canonical JSON and fingerprints.
//!
//! The canonical text of a value is RFC 8785, the JSON Canonicalization
//! Scheme (object members sorted by the UTF-16 code units of their names,
//! no insignificant white space, strings with the minimal escaping of
//! `JSON.stringify`, numbers as ECMAScript prints doubles), with one rule
//! added for numbers that a double does not hold (see `number`): they keep
//! their exact value. The fingerprint is the SHA-256 of the canonical
//! text's UTF-8 bytes.
//!
//! The canonicaliser walks a `Tree` (the binary jsonb of a datum, see
//! `jsonb`, or a `serde_json::Value` in the tests) with an explicit stack,
//! so nesting depth costs heap, not the C stack, and writes into a `Sink`:
//! a text buffer, or SHA-256 directly, so a fingerprint builds no text.
pub mod jsonb;
pub mod number;
#[cfg(test)]
mod properties;
pub mod sql;

use sha2::{Digest, Sha256};
use std::cmp::Ordering;

/// Where canonical text goes.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
    /// A string's UTF-8 bytes as a JSON string, quoted and escaped.
    fn put_string(&mut self, s: &[u8]) {
        write_string(s, self);
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// SHA-256 of what is written, gathered in a buffer of its own first: the
/// canonicaliser writes many short pieces (a comma, a quote), each of which
/// would otherwise be a call into the hash.
pub struct Hasher {
    sha: Sha256,
    len: usize,
    buf: [u8; CHUNK],
}

const CHUNK: usize = 1024;

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    pub fn new() -> Self {
        Hasher {
            sha: Sha256::new(),
            len: 0,
            buf: [0; CHUNK],
        }
    }

    pub fn finish(mut self) -> [u8; 32] {
        self.sha.update(&self.buf[..self.len]);
        self.sha.finalize().into()
    }

    #[cold]
    fn flush_and_put(&mut self, bytes: &[u8]) {
        self.sha.update(&self.buf[..self.len]);
        self.len = 0;
        if bytes.len() > CHUNK {
            self.sha.update(bytes);
        } else {
            self.put(bytes);
        }
    }
}

impl Sink for Hasher {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        if bytes.len() > CHUNK - self.len {
            return self.flush_and_put(bytes);
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// A string that fits the buffer even if every byte were escaped is
    /// copied and escaped into it in one pass, eight bytes at a time where
    /// none needs escaping; a longer one goes through `write_string`.
    fn put_string(&mut self, s: &[u8]) {
        let worst = 2 + 6 * s.len();
        if worst > CHUNK - self.len {
            if worst > CHUNK {
                return write_string(s, self);
            }
            self.sha.update(&self.buf[..self.len]);
            self.len = 0;
        }
        let buf = &mut self.buf;
        let mut at = self.len;
        buf[at] = b'"';
        at += 1;
        let mut words = s.chunks_exact(8);
        for word in &mut words {
            let word: &[u8; 8] = word.try_into().expect("eight bytes");
            if !any_escaped(u64::from_le_bytes(*word)) {
                buf[at..at + 8].copy_from_slice(word);
                at += 8;
            } else {
                for &b in word {
                    at = put_escaped(buf, at, b);
                }
            }
        }
        for &b in words.remainder() {
            at = put_escaped(buf, at, b);
        }
        buf[at] = b'"';
        self.len = at + 1;
    }
}

/// Writes byte `b` of a string at `buf[at..]`, escaped if it must be;
/// returns where the next byte goes.
#[inline]
fn put_escaped(buf: &mut [u8; CHUNK], at: usize, b: u8) -> usize {
    if !ESCAPED[b as usize] {
        buf[at] = b;
        return at + 1;
    }
    let (bytes, n) = escaped(b);
    buf[at..at + 6].copy_from_slice(&bytes);
    at + n
}

/// One JSON value of a tree. Containers and numbers are handles of the
/// tree's own.
#[derive(Clone, Copy)]
pub enum Node<'a, C, N> {
    Null,
    Bool(bool),
    Number(N),
    /// A string's UTF-8 bytes.
    String(&'a [u8]),
    Array(C),
    Object(C),
}

/// A node of tree `T`.
pub type NodeOf<'a, T> = Node<'a, <T as Tree<'a>>::Container, <T as Tree<'a>>::Number>;

/// An object's member: its name and its value.
pub type Member<'a, T> = (&'a [u8], NodeOf<'a, T>);

/// A JSON document the canonicaliser can walk.
pub trait Tree<'a>: Sized {
    type Container: Copy;
    type Number: Copy;
    /// The elements of an array, in order.
    type Items: Iterator<Item = NodeOf<'a, Self>>;
    fn root(&self) -> NodeOf<'a, Self>;
    fn items(&self, array: Self::Container) -> Self::Items;
    /// Appends the members of an object to `out`, in any order.
    fn members(&self, object: Self::Container, out: &mut Vec<Member<'a, Self>>);
    /// Appends a number's exact decimal text (`-12.50`, `1e400` are both
    /// fine) to `out`.
    fn number(&self, n: Self::Number, out: &mut Vec<u8>);
}

enum Frame<'a, T: Tree<'a>> {
    Array {
        items: T::Items,
        first: bool,
    },
    /// The members in canonical order, and the next one to write.
    Object {
        members: Vec<Member<'a, T>>,
        next: usize,
    },
}

/// Writes the canonical text of `tree` into `sink`.
pub fn write<'a, T: Tree<'a>, S: Sink>(tree: &T, sink: &mut S) {
    let mut stack: Vec<Frame<'a, T>> = Vec::new();
    // Member lists of closed objects, kept for the next object to open.
    let mut spare: Vec<Vec<Member<'a, T>>> = Vec::new();
    let mut text: Vec<u8> = Vec::new();
    let mut out = String::new();
    let mut node = tree.root();
    loop {
        match node {
            Node::Null => sink.put(b"null"),
            Node::Bool(true) => sink.put(b"true"),
            Node::Bool(false) => sink.put(b"false"),
            Node::Number(n) => {
                text.clear();
                tree.number(n, &mut text);
                if number::trim_plain(&mut text) {
                    sink.put(&text);
                } else {
                    out.clear();
                    number::canonical_bytes(&text, &mut out);
                    sink.put(out.as_bytes());
                }
            }
            Node::String(s) => sink.put_string(s),
            Node::Array(c) => {
                sink.put(b"[");
                stack.push(Frame::Array {
                    items: tree.items(c),
                    first: true,
                });
            }
            Node::Object(c) => {
                sink.put(b"{");
                let mut members = spare.pop().unwrap_or_default();
                tree.members(c, &mut members);
                // Names are unique within an object, so the order is total.
                members.sort_unstable_by(|a, b| utf16_cmp(a.0, b.0));
                stack.push(Frame::Object { members, next: 0 });
            }
        }
        // The next value to write, closing the containers that are done.
        node = loop {
            match stack.last_mut() {
                None => return,
                Some(Frame::Array { items, first }) => match items.next() {
                    Some(n) => {
                        if !*first {
                            sink.put(b",");
                        }
                        *first = false;
                        break n;
                    }
                    None => {
                        stack.pop();
                        sink.put(b"]");
                    }
                },
                Some(Frame::Object { members, next }) => {
                    if let Some(&(name, n)) = members.get(*next) {
                        if *next > 0 {
                            sink.put(b",");
                        }
                        *next += 1;
                        sink.put_string(name);
                        sink.put(b":");
                        break n;
                    }
                    let mut done = std::mem::take(members);
                    done.clear();
                    spare.push(done);
                    stack.pop();
                    sink.put(b"}");
                }
            }
        };
    }
}

/// Orders two UTF-8 strings by their UTF-16 code units. That is byte order
/// except where a character above U+FFFF (a surrogate pair, 0xD800-0xDFFF
/// in UTF-16; lead byte F0-F4 in UTF-8) meets one in U+E000-U+FFFF (lead
/// byte EE or EF), which UTF-16 sorts after it. The first byte that
/// differs is a lead byte in both strings or a continuation byte in both
/// (the prefix before it is the same characters), and continuation bytes
/// (80-BF) never decide that case.
pub fn utf16_cmp(a: &[u8], b: &[u8]) -> Ordering {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => a.len().cmp(&b.len()),
        Some(i) => {
            let (x, y) = (a[i], b[i]);
            if x >= 0xEE && y >= 0xEE && (x >= 0xF0) != (y >= 0xF0) {
                y.cmp(&x)
            } else {
                x.cmp(&y)
            }
        }
    }
}

/// A string with the minimal escaping of RFC 8785 (that of `JSON.stringify`):
/// `"` and `\`, the short forms `\b \t \n \f \r`, `\u00xx` for the other
/// control characters; everything else as it is. Bytes are looked at eight
/// at a time where none of the eight needs escaping.
fn write_string<S: Sink + ?Sized>(s: &[u8], sink: &mut S) {
    sink.put(b"\"");
    let mut from = 0;
    let mut i = 0;
    while i < s.len() {
        // The next eight bytes, or near the end the last eight (some of
        // them looked at already, which does not change a clean answer).
        let (word, skip_to) = match s.get(i..i + 8) {
            Some(w) => (Some(w), i + 8),
            None => (s.len().checked_sub(8).map(|j| &s[j..]), s.len()),
        };
        if let Some(word) = word {
            if !any_escaped(u64::from_le_bytes(word.try_into().expect("eight bytes"))) {
                i = skip_to;
                continue;
            }
        }
        let b = s[i];
        if ESCAPED[b as usize] {
            sink.put(&s[from..i]);
            escape(b, sink);
            from = i + 1;
        }
        i += 1;
    }
    sink.put(&s[from..]);
    sink.put(b"\"");
}

/// Whether any of the eight bytes of `w` is a control character, `"` or
/// `\` (exact as a yes or no: a byte's borrow only spills into a higher
/// byte after the byte itself has matched).
#[inline]
fn any_escaped(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (control | zero_byte(w ^ (ONES * b'"' as u64)) | zero_byte(w ^ (ONES * b'\\' as u64))) != 0
}

fn escape<S: Sink + ?Sized>(b: u8, sink: &mut S) {
    let (bytes, n) = escaped(b);
    sink.put(&bytes[..n]);
}

/// The escape of a byte that needs one: `\"`, `\\`, a short form, or
/// `\u00xx`; its bytes (padded to six) and its length.
#[inline]
fn escaped(b: u8) -> ([u8; 6], usize) {
    let short = |c: u8| ([b'\\', c, 0, 0, 0, 0], 2);
    match b {
        b'"' => short(b'"'),
        b'\\' => short(b'\\'),
        0x08 => short(b'b'),
        b'\t' => short(b't'),
        b'\n' => short(b'n'),
        0x0C => short(b'f'),
        b'\r' => short(b'r'),
        _ => (
            [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ],
            6,
        ),
    }
}

/// The bytes a string escapes: control characters, `"` and `\`.
const ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex digits of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// A `serde_json::Value` as a tree (numbers need serde_json's
/// `arbitrary_precision`, so they keep their text): what the tests
/// canonicalise.
#[cfg(test)]
pub mod value {
    use super::{Member, Node, NodeOf, Tree};
    use serde_json::Value;

    pub struct ValueTree<'a> {
        pub root: &'a Value,
    }

    impl<'a> ValueTree<'a> {
        pub fn new(root: &'a Value) -> Self {
            ValueTree { root }
        }
    }

    fn node(v: &Value) -> NodeOf<'_, ValueTree<'_>> {
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Number(n),
            Value::String(s) => Node::String(s.as_bytes()),
            Value::Array(_) => Node::Array(v),
            Value::Object(_) => Node::Object(v),
        }
    }

    impl<'a> Tree<'a> for ValueTree<'a> {
        type Container = &'a Value;
        type Number = &'a serde_json::Number;
        type Items = std::iter::Map<std::slice::Iter<'a, Value>, fn(&'a Value) -> NodeOf<'a, Self>>;

        fn root(&self) -> NodeOf<'a, Self> {
            node(self.root)
        }
        fn items(&self, c: &'a Value) -> Self::Items {
            match c {
                Value::Array(items) => items.iter().map(node as fn(&'a Value) -> NodeOf<'a, Self>),
                _ => unreachable!("an array"),
            }
        }
        fn members(&self, c: &'a Value, out: &mut Vec<Member<'a, Self>>) {
            match c {
                Value::Object(map) => out.extend(map.iter().map(|(k, v)| (k.as_bytes(), node(v)))),
                _ => unreachable!("an object"),
            }
        }
        fn number(&self, n: &'a serde_json::Number, out: &mut Vec<u8>) {
            out.extend_from_slice(n.to_string().as_bytes());
        }
    }

    /// The canonical text of JSON text.
    pub fn canonical(text: &str) -> String {
        let v: Value = serde_json::from_str(text).expect("valid JSON");
        let mut out = Vec::new();
        super::write(&ValueTree::new(&v), &mut out);
        String::from_utf8(out).expect("canonical text is UTF-8")
    }
}

/// A repeatable stream of pseudo-random numbers (xorshift64) for tests that
/// sweep many generated inputs.
#[cfg(test)]
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[cfg(test)]
mod unit {
    use super::value::canonical as canon;
    use super::*;

    /// RFC 8785, section 3.2.2 and 3.2.3: the sorting and the whole example.
    #[test]
    fn rfc8785_examples() {
        let sorting = r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}"#;
        assert_eq!(
            canon(sorting),
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        // The RFC's own example writes 333333333.33333329, more digits than a
        // double holds, and RFC 8785 prints the double's 333333333.3333333.
        // Here a number keeps its value unless a double holds it (see
        // `number`), so the example is given with the double's text, as a
        // client's JSON parser would hand it over, and the longer number
        // stays as it is.
        let example = r#"{"numbers": [333333333.3333333, 1E30, 4.50, 2e-3, 0.000000000000000000000000001], "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/", "literals": [null, true, false]}"#;
        let want = "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}";
        assert_eq!(canon(example), want);
        assert_eq!(
            canon(&example.replace("333333333.3333333", "333333333.33333329")),
            want.replace("333333333.3333333", "333333333.33333329")
        );
    }

    #[test]
    fn fingerprint_is_sha256_of_canonical_text() {
        // sha256("{}") and sha256("[]") as published by any SHA-256 tool.
        let sha = |t: &str| hex(&Sha256::digest(canon(t).as_bytes()));
        assert_eq!(
            sha("{ }"),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            sha("[ ]"),
            "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
        );
        assert_eq!(canon(r#"{"b":1,"a":2}"#), canon(r#"{"a":2, "b":1.0}"#));
    }

    #[test]
    fn utf16_order_of_names() {
        let cases: &[(&str, &str)] = &[
            ("", "a"),
            ("a", "b"),
            ("ab", "b"),
            ("\u{7f}", "\u{80}"),
            // U+1F600 is the pair D83D DE00: before U+E000 and U+FB33.
            ("\u{1f600}", "\u{e000}"),
            ("\u{1f600}", "\u{fb33}"),
            ("x\u{1f600}", "x\u{ffff}"),
            ("\u{d7ff}", "\u{1f600}"),
            ("\u{10000}", "\u{10001}"),
            // Differing in a continuation byte, and across lengths.
            ("\u{e000}", "\u{e001}"),
            ("\u{1f600}", "\u{1f601}"),
            ("\u{10000}", "\u{ffff}x"),
            ("\u{fb33}", "\u{fb33}a"),
        ];
        for (a, b) in cases {
            let units = |s: &str| s.encode_utf16().collect::<Vec<_>>();
            assert!(units(a) < units(b), "{a:?} < {b:?} in UTF-16");
            assert_eq!(
                utf16_cmp(a.as_bytes(), b.as_bytes()),
                Ordering::Less,
                "{a:?} {b:?}"
            );
            assert_eq!(utf16_cmp(b.as_bytes(), a.as_bytes()), Ordering::Greater);
        }
    }

    /// The eight-byte test says yes exactly when one of the eight bytes is
    /// escaped: every byte value at every position among bytes that are
    /// not, and random words.
    #[test]
    fn word_test_agrees_with_the_table() {
        let bytewise = |w: u64| w.to_le_bytes().iter().any(|b| ESCAPED[*b as usize]);
        for fill in [b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff] {
            for pos in 0..8 {
                for b in 0..=255u8 {
                    let mut bytes = [fill; 8];
                    bytes[pos] = b;
                    let w = u64::from_le_bytes(bytes);
                    assert_eq!(any_escaped(w), bytewise(w), "{bytes:?}");
                }
            }
        }
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..1_000_000 {
            let x = next();
            assert_eq!(any_escaped(x), bytewise(x), "{x:#x}");
        }
    }

    /// Strings of every length up to 40 with an escaped byte (or two) at
    /// every position escape as serde_json escapes them.
    #[test]
    fn escapes_at_every_position() {
        for len in 0..40 {
            for pos in 0..len {
                for (b, b2) in [
                    (b'"', None),
                    (b'\\', Some(0x01)),
                    (b'\n', Some(b'"')),
                    (0x1f, None),
                ] {
                    let mut bytes = vec![b'a'; len];
                    bytes[pos] = b;
                    if let Some(b2) = b2 {
                        bytes[len - 1 - pos] = b2;
                    }
                    let text = String::from_utf8(bytes).unwrap();
                    let mut out = Vec::new();
                    write_string(text.as_bytes(), &mut out);
                    // The hasher's own one-pass copy writes the same bytes,
                    // also after a prefix that leaves the buffer nearly full.
                    for prefix in [0, CHUNK - 3 - 6 * len, CHUNK - 1] {
                        let mut hasher = Hasher::new();
                        hasher.put(&vec![b' '; prefix]);
                        hasher.put_string(text.as_bytes());
                        let mut want = vec![b' '; prefix];
                        want.extend_from_slice(&out);
                        assert_eq!(hasher.finish(), <[u8; 32]>::from(Sha256::digest(&want)));
                    }
                    let back: String = serde_json::from_slice(&out).expect("a JSON string");
                    assert_eq!(back, text);
                    let escapes = out.iter().filter(|c| **c == b'\\').count();
                    let want = text.bytes().filter(|c| ESCAPED[*c as usize]).count()
                        + text.bytes().filter(|c| *c == b'\\').count();
                    assert_eq!(
                        escapes,
                        want,
                        "{text:?} -> {:?}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        }
    }

    /// Nesting deeper than any recursion limit: the stack is on the heap.
    #[test]
    fn deep_nesting() {
        let depth = 100_000;
        let mut v = serde_json::Value::Null;
        for i in 0..depth {
            v = if i % 2 == 0 {
                serde_json::Value::Array(vec![v])
            } else {
                let mut map = serde_json::Map::new();
                map.insert("k".into(), v);
                serde_json::Value::Object(map)
            };
        }
        let mut out = Vec::new();
        write(&value::ValueTree::new(&v), &mut out);
        let text = String::from_utf8(out).unwrap();
        // serde_json's Value drops recursively, deeper than a test
        // thread's stack: never drop it (not even while a failed assert
        // unwinds).
        let v = std::mem::ManuallyDrop::new(v);
        let _ = &v;
        assert!(text.starts_with("{\"k\":[{\"k\":["));
        assert!(text.contains("[null]}]}"));
        assert!(text.ends_with("]}]}"));
        assert_eq!(text.matches('[').count(), depth / 2);
    }
}
