//! Property tests of the canonicaliser on random documents: the output
//! parses back to an equal value, does not depend on member order or white
//! space, tells apart every two different values, and nothing panics.
use super::number::{canonical as canonical_number, same_value};
use super::value::ValueTree;
use super::{write, Member, NodeOf, Tree};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

/// Numbers of every kind: doubles' shortest texts, exact integers past
/// 2^53, long decimals, huge and tiny exponents.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|i| i.to_string()),
        (any::<i64>(), 0usize..25).prop_map(|(m, s)| {
            let t = m.unsigned_abs().to_string();
            let t = if s == 0 {
                t
            } else if s >= t.len() {
                format!("0.{}{t}", "0".repeat(s - t.len()))
            } else {
                format!("{}.{}", &t[..t.len() - s], &t[t.len() - s..])
            };
            if m < 0 {
                format!("-{t}")
            } else {
                t
            }
        }),
        ("[1-9][0-9]{0,40}", -400i32..400).prop_map(|(d, e)| format!("{d}e{e}")),
        (-(1i64 << 60)..(1i64 << 60)).prop_map(|i| i.to_string()),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(|t| Value::Number(t.parse::<Number>().expect("JSON number"))),
        any::<String>().prop_map(Value::String),
        "[\"\\\\\\x00-\\x1f\u{7f}-\u{a0}\u{e000}\u{ffff}\u{10000}\u{1f600}a-z]{0,8}"
            .prop_map(Value::String),
    ]
}

fn document() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(("[a-c\u{e000}\u{1f600}\"]{0,3}|\\PC{0,4}", inner), 0..8)
                .prop_map(|members| Value::Object(members.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn canonical(v: &Value) -> String {
    let mut out = Vec::new();
    write(&ValueTree::new(v), &mut out);
    String::from_utf8(out).expect("UTF-8")
}

/// Equality of JSON values, numbers by value.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => same_value(&x.to_string(), &y.to_string()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// The same document with every object's members in another order.
struct Reordered<'a>(ValueTree<'a>, usize);

impl<'a> Tree<'a> for Reordered<'a> {
    type Container = <ValueTree<'a> as Tree<'a>>::Container;
    type Number = <ValueTree<'a> as Tree<'a>>::Number;
    type Items = <ValueTree<'a> as Tree<'a>>::Items;
    fn root(&self) -> NodeOf<'a, Self> {
        self.0.root()
    }
    fn items(&self, c: Self::Container) -> Self::Items {
        self.0.items(c)
    }
    fn members(&self, c: Self::Container, out: &mut Vec<Member<'a, Self>>) {
        let from = out.len();
        self.0.members(c, out);
        let n = out.len() - from;
        if n > 0 {
            out[from..].rotate_left(self.1 % n);
        }
    }
    fn number(&self, n: Self::Number, out: &mut Vec<u8>) {
        self.0.number(n, out)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parses_back_to_an_equal_value(v in document()) {
        let text = canonical(&v);
        let back: Value = serde_json::from_str(&text).expect("canonical text is JSON");
        prop_assert!(same(&v, &back), "{text}");
        // And it is its own canonical form.
        prop_assert_eq!(canonical(&back), text);
    }

    #[test]
    fn member_order_and_white_space_do_not_matter(v in document(), shift in 1usize..7) {
        let text = canonical(&v);
        let mut reordered = Vec::new();
        write(&Reordered(ValueTree::new(&v), shift), &mut reordered);
        prop_assert_eq!(String::from_utf8(reordered).unwrap(), text.clone());
        let pretty: Value = serde_json::from_str(&serde_json::to_string_pretty(&v).unwrap()).unwrap();
        prop_assert_eq!(canonical(&pretty), text);
    }

    #[test]
    fn different_values_have_different_texts(a in document(), b in document()) {
        prop_assert_eq!(same(&a, &b), canonical(&a) == canonical(&b));
    }

    /// Numbers close to each other, where rounding to a double would merge
    /// them: a double's shortest text against the same with a digit more,
    /// a digit changed, or an integer past 2^53 against its neighbour.
    #[test]
    fn near_numbers_stay_apart(f in any::<f64>().prop_filter("finite", |f| f.is_finite() && *f != 0.0),
                               extra in 1u8..10, i in (1i64 << 53)..(1i64 << 62)) {
        let base = super::number::es_number(f);
        let longer = match base.split_once('e') {
            Some((m, e)) if m.contains('.') => format!("{m}{extra}e{e}"),
            Some((m, e)) => format!("{m}.0{extra}e{e}"),
            None if base.contains('.') => format!("{base}{extra}"),
            None => format!("{base}.0{extra}"),
        };
        let texts = |t: &str| { let mut s = String::new(); canonical_number(t, &mut s); s };
        prop_assert_ne!(texts(&base), texts(&longer));
        prop_assert_eq!(texts(&base), base.clone());
        prop_assert_ne!(texts(&i.to_string()), texts(&(i + 1).to_string()));
        let back: f64 = texts(&base).parse().unwrap();
        prop_assert_eq!(back, f);
    }

    /// The fingerprint is the SHA-256 of the canonical text, whatever the
    /// size (the hasher takes it in chunks).
    #[test]
    fn fingerprint_is_sha256_of_the_text(v in document(), pad in 0usize..40_000) {
        use sha2::Digest;
        let v = Value::Array(vec![Value::String("x".repeat(pad)), v]);
        let text = canonical(&v);
        let mut hasher = super::Hasher::new();
        write(&ValueTree::new(&v), &mut hasher);
        let want: [u8; 32] = sha2::Sha256::digest(text.as_bytes()).into();
        prop_assert_eq!(hasher.finish(), want);
    }

    #[test]
    fn any_number_text_is_safe(t in "[-+0-9.eE]{0,30}") {
        let mut s = String::new();
        canonical_number(&t, &mut s);
        // Valid JSON numbers keep their value.
        if let Ok(Value::Number(_)) = serde_json::from_str::<Value>(&t) {
            prop_assert!(same_value(&t, &s), "{t} -> {s}");
        }
    }
}
