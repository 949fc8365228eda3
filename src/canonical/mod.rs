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
use std::fmt::Write;

/// Where canonical text goes.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// SHA-256 of what is written, fed in chunks: the canonicaliser writes
/// many short pieces (a comma, a quote), each of which would otherwise be a
/// call into the hash.
pub struct Hasher {
    sha: Sha256,
    buf: Vec<u8>,
}

const CHUNK: usize = 16 * 1024;

impl Hasher {
    pub fn new() -> Self {
        Hasher {
            sha: Sha256::new(),
            buf: Vec::with_capacity(CHUNK),
        }
    }

    pub fn finish(mut self) -> [u8; 32] {
        self.sha.update(&self.buf);
        self.sha.finalize().into()
    }
}

impl Sink for Hasher {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > CHUNK {
            self.sha.update(&self.buf);
            self.buf.clear();
        }
        if bytes.len() > CHUNK {
            self.sha.update(bytes);
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }
}

/// One JSON value of a tree. Containers are handles of the tree's own.
pub enum Node<'a, C> {
    Null,
    Bool(bool),
    /// A number as exact decimal text (`-12.50`, `1e400` are both fine).
    Number(std::borrow::Cow<'a, str>),
    /// A string's UTF-8 bytes.
    String(&'a [u8]),
    Array(C),
    Object(C),
}

/// A JSON document the canonicaliser can walk.
pub trait Tree<'a> {
    type Container: Copy;
    fn root(&self) -> Node<'a, Self::Container>;
    /// Elements of an array, or members of an object.
    fn len(&self, c: Self::Container) -> usize;
    fn item(&self, c: Self::Container, i: usize) -> Node<'a, Self::Container>;
    /// The name and value of member `i` of an object.
    fn key(&self, c: Self::Container, i: usize) -> &'a [u8];
    fn value(&self, c: Self::Container, i: usize) -> Node<'a, Self::Container>;
}

enum Frame<'a, C> {
    Array {
        c: C,
        next: usize,
        len: usize,
    },
    /// The members' names, in canonical order, with their positions.
    Object {
        c: C,
        next: usize,
        members: Vec<(&'a [u8], u32)>,
    },
}

/// Writes the canonical text of `tree` into `sink`.
pub fn write<'a, T: Tree<'a>, S: Sink>(tree: &T, sink: &mut S) {
    let mut stack: Vec<Frame<'a, T::Container>> = Vec::new();
    let mut buf = String::new();
    open(tree, tree.root(), sink, &mut stack, &mut buf);
    while let Some(frame) = stack.last_mut() {
        let node = match frame {
            Frame::Array { c, next, len } => {
                if *next == *len {
                    stack.pop();
                    sink.put(b"]");
                    continue;
                }
                if *next > 0 {
                    sink.put(b",");
                }
                *next += 1;
                tree.item(*c, *next - 1)
            }
            Frame::Object { c, next, members } => {
                if *next == members.len() {
                    stack.pop();
                    sink.put(b"}");
                    continue;
                }
                if *next > 0 {
                    sink.put(b",");
                }
                let (name, i) = members[*next];
                *next += 1;
                write_string(name, sink);
                sink.put(b":");
                tree.value(*c, i as usize)
            }
        };
        open(tree, node, sink, &mut stack, &mut buf);
    }
}

/// Writes a scalar, or the opening of a container (pushed on the stack).
fn open<'a, T: Tree<'a>, S: Sink>(
    tree: &T,
    node: Node<'a, T::Container>,
    sink: &mut S,
    stack: &mut Vec<Frame<'a, T::Container>>,
    buf: &mut String,
) {
    match node {
        Node::Null => sink.put(b"null"),
        Node::Bool(true) => sink.put(b"true"),
        Node::Bool(false) => sink.put(b"false"),
        Node::Number(text) => {
            buf.clear();
            number::canonical(&text, buf);
            sink.put(buf.as_bytes());
        }
        Node::String(s) => write_string(s, sink),
        Node::Array(c) => {
            sink.put(b"[");
            stack.push(Frame::Array {
                c,
                next: 0,
                len: tree.len(c),
            });
        }
        Node::Object(c) => {
            sink.put(b"{");
            let mut members: Vec<(&'a [u8], u32)> = (0..tree.len(c))
                .map(|i| (tree.key(c, i), i as u32))
                .collect();
            // Names are unique within an object, so the order is total.
            members.sort_by(|a, b| utf16_cmp(a.0, b.0));
            stack.push(Frame::Object {
                c,
                next: 0,
                members,
            });
        }
    }
}

/// Orders two UTF-8 strings by their UTF-16 code units. That is byte order
/// except where a character above U+FFFF (a surrogate pair, 0xD800-0xDFFF
/// in UTF-16) meets one in U+E000-U+FFFF, which UTF-16 sorts after it.
pub fn utf16_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    if common == a.len() || common == b.len() {
        return a.len().cmp(&b.len());
    }
    // Compare the characters that differ, from their first bytes.
    let start = |s: &[u8]| {
        let mut i = common;
        while i > 0 && (s[i] & 0xC0) == 0x80 {
            i -= 1;
        }
        i
    };
    let (ca, cb) = (char_at(a, start(a)), char_at(b, start(b)));
    let unit = |c: u32| if c >= 0x10000 { 0xD800 } else { c };
    unit(ca).cmp(&unit(cb)).then(ca.cmp(&cb))
}

fn char_at(s: &[u8], i: usize) -> u32 {
    let b0 = s[i] as u32;
    let cont = |k: usize| (s.get(i + k).copied().unwrap_or(0x80) & 0x3F) as u32;
    match b0 {
        0x00..=0x7F => b0,
        0xC0..=0xDF => ((b0 & 0x1F) << 6) | cont(1),
        0xE0..=0xEF => ((b0 & 0x0F) << 12) | (cont(1) << 6) | cont(2),
        _ => ((b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3),
    }
}

/// A string with the minimal escaping of RFC 8785 (that of `JSON.stringify`):
/// `"` and `\`, the short forms `\b \t \n \f \r`, `\u00xx` for the other
/// control characters; everything else as it is.
fn write_string<S: Sink>(s: &[u8], sink: &mut S) {
    sink.put(b"\"");
    let mut from = 0;
    for (i, &b) in s.iter().enumerate() {
        if !ESCAPED[b as usize] {
            continue;
        }
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0C => b"\\f",
            b'\r' => b"\\r",
            _ => b"",
        };
        sink.put(&s[from..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            sink.put(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            sink.put(short);
        }
        from = i + 1;
    }
    sink.put(&s[from..]);
    sink.put(b"\"");
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

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A `serde_json::Value` as a tree (numbers need serde_json's
/// `arbitrary_precision`, so they keep their text): what the tests
/// canonicalise.
#[cfg(test)]
pub mod value {
    use super::{Node, Tree};
    use serde_json::Value;
    use std::borrow::Cow;

    #[derive(Clone, Copy)]
    pub struct Container<'a>(&'a Value);

    pub struct ValueTree<'a> {
        pub root: &'a Value,
        /// Members of each object in storage order, by object address.
        members: std::collections::HashMap<usize, Vec<(&'a String, &'a Value)>>,
    }

    impl<'a> ValueTree<'a> {
        pub fn new(root: &'a Value) -> Self {
            let mut members = std::collections::HashMap::new();
            let mut todo = vec![root];
            while let Some(v) = todo.pop() {
                match v {
                    Value::Array(items) => todo.extend(items.iter()),
                    Value::Object(map) => {
                        members.insert(v as *const Value as usize, map.iter().collect::<Vec<_>>());
                        todo.extend(map.values());
                    }
                    _ => {}
                }
            }
            ValueTree { root, members }
        }

        fn node(&self, v: &'a Value) -> Node<'a, Container<'a>> {
            match v {
                Value::Null => Node::Null,
                Value::Bool(b) => Node::Bool(*b),
                Value::Number(n) => Node::Number(Cow::Owned(n.to_string())),
                Value::String(s) => Node::String(s.as_bytes()),
                Value::Array(_) => Node::Array(Container(v)),
                Value::Object(_) => Node::Object(Container(v)),
            }
        }

        fn member(&self, c: Container<'a>, i: usize) -> (&'a String, &'a Value) {
            self.members[&(c.0 as *const Value as usize)][i]
        }
    }

    impl<'a> Tree<'a> for ValueTree<'a> {
        type Container = Container<'a>;
        fn root(&self) -> Node<'a, Container<'a>> {
            self.node(self.root)
        }
        fn len(&self, c: Container<'a>) -> usize {
            match c.0 {
                Value::Array(items) => items.len(),
                Value::Object(map) => map.len(),
                _ => 0,
            }
        }
        fn item(&self, c: Container<'a>, i: usize) -> Node<'a, Container<'a>> {
            match c.0 {
                Value::Array(items) => self.node(&items[i]),
                _ => unreachable!("an array"),
            }
        }
        fn key(&self, c: Container<'a>, i: usize) -> &'a [u8] {
            self.member(c, i).0.as_bytes()
        }
        fn value(&self, c: Container<'a>, i: usize) -> Node<'a, Container<'a>> {
            self.node(self.member(c, i).1)
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
