//! Traefik's HTTP rule language: the parser, the syntax tree and request matching.
//!
//! A rule combines matchers such as ``Host(`example.com`)`` with `!`, `&&` and `||` (`&&` binds
//! tighter than `||`) and parentheses. Both Traefik syntaxes are accepted at once, so a router's
//! `ruleSyntax` setting makes no difference:
//!
//! - v3: one argument per matcher, `Header`, `HeaderRegexp`, `Query(k[, v])`, `QueryRegexp`.
//! - v2: several arguments per matcher (any of them may match), the names `Headers`,
//!   `HeadersRegexp` and `HostHeader`, ``Query(`k=v`)``, and gorilla/mux placeholders such as
//!   `{id}` or `{id:[0-9]+}` in `Host`, `HostRegexp`, `Path` and `PathPrefix` arguments.
//!
//! [`parse`] compiles every regular expression up front, so [`Expr::matches`] returns a plain
//! `bool`. The parser bounds the rule length and the nesting depth, and it reports malformed
//! input as an error instead of panicking, which a test checks with truncated and random rules.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

/// Maximum length of a rule in bytes.
pub const MAX_RULE_BYTES: usize = 64 * 1024;

/// Maximum nesting of parentheses and `!` operators.
pub const MAX_NESTING: usize = 64;

/// Maximum compiled size of one regular expression, in bytes. A router needs far less, and the
/// limit keeps a hostile pattern such as `(a{1000}){1000}` from taking gigabytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Maximum length of the rule text quoted in an error message, in bytes.
const MAX_QUOTED_RULE_BYTES: usize = 200;

/// A parsed rule.
///
/// Chains such as `a && b && c` are stored as balanced trees, so the depth stays logarithmic
/// in the number of operands. `&&` and `||` are evaluated left to right with short-circuiting.
#[derive(Debug, Clone)]
pub enum Expr {
    /// Both sides match.
    And(Box<Expr>, Box<Expr>),
    /// Either side matches.
    Or(Box<Expr>, Box<Expr>),
    /// The operand does not match.
    Not(Box<Expr>),
    /// One matcher.
    Matcher(Matcher),
}

/// One matcher of a rule. Matchers that take several arguments (the v2 form) match when any
/// argument matches.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// `Host`: the request host equals one of the patterns.
    Host(Vec<HostPattern>),
    /// `HostRegexp`: the lowercased request host matches one of the expressions.
    HostRegexp(Vec<Regex>),
    /// `Path`: the routing path equals one of the paths.
    Path(Vec<String>),
    /// `PathPrefix`: the routing path starts with one of the prefixes.
    PathPrefix(Vec<String>),
    /// `PathRegexp`, and `Path` or `PathPrefix` with v2 placeholders: the routing path matches
    /// one of the expressions.
    PathRegexp(Vec<Regex>),
    /// `Method`: the request method equals one of the upper-case methods.
    Method(Vec<String>),
    /// `Header`: some value of header `name` equals `value` exactly.
    Header {
        /// Header name, compared case-insensitively.
        name: String,
        /// Expected value, compared case-sensitively.
        value: String,
    },
    /// `HeaderRegexp`: some value of header `name` matches `pattern`.
    HeaderRegexp {
        /// Header name, compared case-insensitively.
        name: String,
        /// Expression applied to each value.
        pattern: regex::bytes::Regex,
    },
    /// `Query`: some query parameter named `key` has the value `value`.
    Query {
        /// Parameter name after percent-decoding.
        key: String,
        /// Expected value after percent-decoding. `None` accepts any value, which only the
        /// v2 form with an empty value, ``Query(`k=`)``, produces. The v3 form ``Query(`k`)``
        /// expects the empty value, as in Traefik.
        value: Option<String>,
    },
    /// `QueryRegexp`: some value of query parameter `key` matches `pattern`.
    QueryRegexp {
        /// Parameter name after percent-decoding.
        key: String,
        /// Expression applied to each decoded value.
        pattern: regex::bytes::Regex,
    },
    /// `ClientIP`: the TCP peer address is in one of the networks. `X-Forwarded-For` is never
    /// consulted.
    ClientIp(Vec<IpNet>),
}

/// One argument of a `Host` matcher.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// A host name or IP address, lowercased, without a trailing dot.
    Exact(String),
    /// `*.example.com`, stored as the suffix `example.com`. It matches names with exactly one
    /// more label, such as `a.example.com`, but neither `example.com` nor `a.b.example.com`.
    Wildcard(String),
    /// ``Host(`*`)``: every request, including one without a host.
    Any,
}

/// The parts of a request that rules look at.
pub trait RequestView {
    /// Returns the host: lowercased, without port, IPv6 brackets or one trailing dot. It may be
    /// empty.
    fn host(&self) -> &str;

    /// Returns the routing path: the request-target path without the query.
    fn path(&self) -> &str;

    /// Returns the request method.
    fn method(&self) -> &str;

    /// Returns the raw query string without the `?`. It may be empty.
    fn query(&self) -> &str;

    /// Returns the address of the TCP peer.
    fn client_ip(&self) -> IpAddr;

    /// Calls `f` on each value of header `name`, matched case-insensitively, and returns true
    /// as soon as `f` returns true. Returns false when no call returned true.
    fn header_values(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

/// An error in a rule, with the rule text, the position and a hint where one helps.
///
/// It displays as, for example: ``invalid rule "Host(`a`": expected ')' at byte 9``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    rule: String,
    position: Option<usize>,
    kind: RuleErrorKind,
    hint: Option<String>,
}

/// Kind of problem found in a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleErrorKind {
    /// The rule is empty or only whitespace.
    #[error("rule is empty")]
    Empty,
    /// The rule is longer than [`MAX_RULE_BYTES`].
    #[error("rule is {length} bytes long, above the maximum of {max} bytes")]
    TooLong {
        /// Length of the rule in bytes.
        length: usize,
        /// The maximum.
        max: usize,
    },
    /// Parentheses and `!` are nested deeper than [`MAX_NESTING`].
    #[error("parentheses and '!' are nested more than {max} levels deep")]
    TooDeep {
        /// The maximum.
        max: usize,
    },
    /// A token other than the expected one, or the end of the rule.
    #[error("expected {expected}{}", found_suffix(found))]
    Unexpected {
        /// Tokens that the grammar allows at this position.
        expected: &'static str,
        /// The character found, or `None` at the end of the rule.
        found: Option<String>,
    },
    /// A string literal without its closing quote.
    #[error("unterminated {quote} string")]
    UnterminatedString {
        /// `backtick`, `double-quoted` or `single-quoted`.
        quote: &'static str,
    },
    /// An escape sequence that Go string literals do not define.
    #[error("invalid escape sequence {sequence} in double-quoted string")]
    InvalidEscape {
        /// The sequence as written.
        sequence: String,
    },
    /// A double-quoted string whose escapes produce invalid UTF-8.
    #[error("double-quoted string is not valid UTF-8")]
    InvalidUtf8,
    /// A string in single quotes, which Go reads as a rune literal.
    #[error("single quotes are not accepted")]
    SingleQuotes,
    /// The whole rule is wrapped in quotes, as happens with shell or YAML quoting mistakes.
    #[error("the whole rule is wrapped in quotes")]
    WrappedInQuotes,
    /// An argument without quotes where only a quoted string is accepted.
    #[error("argument {argument} of {matcher} is not quoted")]
    UnquotedArgument {
        /// The matcher name as written.
        matcher: String,
        /// The argument as written.
        argument: String,
    },
    /// A matcher name that is not known in any accepted spelling.
    #[error("unknown matcher {name}")]
    UnknownMatcher {
        /// The name as written.
        name: String,
    },
    /// A matcher called with the wrong number of arguments.
    #[error("{matcher} takes {expected}, found {found}")]
    ArgumentCount {
        /// The matcher name as written.
        matcher: String,
        /// The accepted count, in words.
        expected: &'static str,
        /// The number of arguments found.
        found: usize,
    },
    /// An empty string where a value is required.
    #[error("empty argument in {matcher}")]
    EmptyArgument {
        /// The matcher name as written.
        matcher: String,
    },
    /// A host with characters outside ASCII.
    #[error("host `{host}` contains non-ASCII characters")]
    NonAsciiHost {
        /// The host as written.
        host: String,
    },
    /// A host that can never match a request.
    #[error("invalid host `{host}`: {reason}")]
    InvalidHost {
        /// The host as written.
        host: String,
        /// Reason the host can never match.
        reason: String,
    },
    /// A `Path` or `PathPrefix` argument that does not start with `/`.
    #[error("path `{path}` of {matcher} does not start with '/'")]
    RelativePath {
        /// The matcher name as written.
        matcher: String,
        /// The path as written.
        path: String,
    },
    /// A v2 placeholder such as `{id:[0-9]+}` that is not closed.
    #[error("unclosed placeholder in `{value}`")]
    UnclosedPlaceholder {
        /// The argument as written.
        value: String,
    },
    /// An argument of the v2 form ``Query(`k=v`, ...)`` without `=`.
    #[error("query argument `{argument}` is not a key=value pair")]
    InvalidQueryPair {
        /// The argument as written.
        argument: String,
    },
    /// A regular expression that does not compile.
    #[error("invalid regular expression `{pattern}`: {reason}")]
    InvalidRegex {
        /// The expression as compiled (after placeholder conversion).
        pattern: String,
        /// The compiler's message.
        reason: String,
    },
    /// A method that is not an HTTP token.
    #[error("invalid method `{method}`")]
    InvalidMethod {
        /// The method as written.
        method: String,
    },
    /// A header name that is not an HTTP token.
    #[error("invalid header name `{name}`")]
    InvalidHeaderName {
        /// The name as written.
        name: String,
    },
    /// A `ClientIP` argument that is neither an IP address nor a CIDR block.
    #[error("invalid IP address or CIDR `{value}`")]
    InvalidClientIp {
        /// The argument as written.
        value: String,
    },
}

/// Parses a rule and compiles its regular expressions.
///
/// # Errors
///
/// Returns a [`RuleError`] for syntax errors, unknown matchers, wrong argument counts, invalid
/// hosts, paths, methods, header names, IP addresses or regular expressions, and rules longer
/// than [`MAX_RULE_BYTES`] or nested deeper than [`MAX_NESTING`]. The error names the rule and
/// the 1-based byte position, and where it helps it shows a corrected rule.
pub fn parse(rule: &str) -> Result<Expr, RuleError> {
    if rule.len() > MAX_RULE_BYTES {
        let kind = RuleErrorKind::TooLong {
            length: rule.len(),
            max: MAX_RULE_BYTES,
        };
        return Err(RuleError::new(rule, None, kind));
    }
    let trimmed = rule.trim();
    if trimmed.is_empty() {
        return Err(RuleError::new(rule, None, RuleErrorKind::Empty));
    }
    if let Some(inner) = strip_outer_quotes(trimmed) {
        let position = rule.len() - rule.trim_start().len();
        return Err(
            RuleError::new(rule, Some(position), RuleErrorKind::WrappedInQuotes)
                .with_hint(format!("remove them: {inner}")),
        );
    }

    let mut parser = Parser::new(rule);
    let syntax = parser.parse_rule()?;
    if let Some(first) = parser.single_quoted.first() {
        let corrected = replace_spans(rule, &parser.single_quoted, |text| {
            format!("`{}`", &text[1..text.len() - 1])
        });
        return Err(
            RuleError::new(rule, Some(first.start), RuleErrorKind::SingleQuotes)
                .with_hint(format!("write {corrected}")),
        );
    }

    let builder = Builder {
        rule,
        bare: &parser.bare,
    };
    builder.build(syntax)
}

impl Expr {
    /// Returns whether the request matches the rule.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        match self {
            Expr::And(left, right) => left.matches(req) && right.matches(req),
            Expr::Or(left, right) => left.matches(req) || right.matches(req),
            Expr::Not(operand) => !operand.matches(req),
            Expr::Matcher(matcher) => matcher.matches(req),
        }
    }

    /// Returns the set of host patterns that every matching request satisfies, if the rule
    /// implies one.
    ///
    /// `Host(a, b)` gives `{a, b}`. `l && r` gives the set of `l`, or else the set of `r`.
    /// `l || r` gives the union when both sides have a set. `!x` and other matchers give
    /// `None`.
    pub fn host_constraint(&self) -> Option<Vec<HostPattern>> {
        match self {
            Expr::Matcher(Matcher::Host(patterns)) => Some(patterns.clone()),
            Expr::And(left, right) => left.host_constraint().or_else(|| right.host_constraint()),
            Expr::Or(left, right) => {
                let mut union = left.host_constraint()?;
                for pattern in right.host_constraint()? {
                    if !union.contains(&pattern) {
                        union.push(pattern);
                    }
                }
                Some(union)
            }
            Expr::Not(_) | Expr::Matcher(_) => None,
        }
    }

    /// Returns every host named by a `Host` matcher anywhere in the rule, negated ones
    /// included, in order of appearance and without duplicates. Wildcards appear as
    /// `*.example.com`. ``Host(`*`)`` names no host and is left out.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts = Vec::new();
        self.collect_hosts(&mut hosts);
        hosts
    }

    fn collect_hosts(&self, hosts: &mut Vec<String>) {
        match self {
            Expr::And(left, right) | Expr::Or(left, right) => {
                left.collect_hosts(hosts);
                right.collect_hosts(hosts);
            }
            Expr::Not(operand) => operand.collect_hosts(hosts),
            Expr::Matcher(Matcher::Host(patterns)) => {
                for pattern in patterns {
                    if *pattern == HostPattern::Any {
                        continue;
                    }
                    let name = pattern.to_string();
                    if !hosts.contains(&name) {
                        hosts.push(name);
                    }
                }
            }
            Expr::Matcher(_) => {}
        }
    }
}

impl Matcher {
    /// Returns whether the request matches this matcher.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        match self {
            Matcher::Host(patterns) => {
                let host = req.host();
                patterns.iter().any(|pattern| pattern.matches(host))
            }
            Matcher::HostRegexp(patterns) => {
                let host = req.host();
                patterns.iter().any(|pattern| pattern.is_match(host))
            }
            Matcher::Path(paths) => {
                let path = req.path();
                paths.iter().any(|expected| path == expected)
            }
            Matcher::PathPrefix(prefixes) => {
                let path = req.path();
                prefixes
                    .iter()
                    .any(|prefix| path.starts_with(prefix.as_str()))
            }
            Matcher::PathRegexp(patterns) => {
                let path = req.path();
                patterns.iter().any(|pattern| pattern.is_match(path))
            }
            Matcher::Method(methods) => {
                let method = req.method();
                methods.iter().any(|expected| method == expected)
            }
            Matcher::Header { name, value } => {
                req.header_values(name, &mut |found| found == value.as_bytes())
            }
            Matcher::HeaderRegexp { name, pattern } => {
                req.header_values(name, &mut |found| pattern.is_match(found))
            }
            Matcher::Query { key, value } => {
                for_each_query_value(req.query(), key, |found| match value {
                    Some(expected) => found == expected.as_bytes(),
                    None => true,
                })
            }
            Matcher::QueryRegexp { key, pattern } => {
                for_each_query_value(req.query(), key, |found| pattern.is_match(found))
            }
            Matcher::ClientIp(networks) => {
                let candidates = ip_forms(req.client_ip());
                networks
                    .iter()
                    .any(|network| candidates.iter().any(|ip| network.contains(ip)))
            }
        }
    }
}

impl HostPattern {
    /// Returns whether `host` (lowercased, without port or trailing dot) matches the pattern.
    /// An empty host matches only [`HostPattern::Any`].
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(expected) => !host.is_empty() && host == expected,
            HostPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    /// Writes the pattern as it is written in a rule: `example.com`, `*.example.com` or `*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(host) => f.write_str(host),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

impl RuleError {
    fn new(rule: &str, position: Option<usize>, kind: RuleErrorKind) -> Self {
        RuleError {
            rule: rule.to_owned(),
            position,
            kind,
            hint: None,
        }
    }

    fn with_hint(mut self, hint: String) -> Self {
        self.hint = Some(hint);
        self
    }

    /// Returns the rule as given to [`parse`].
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// Returns the 1-based byte position of the error, when it has one.
    pub fn position(&self) -> Option<usize> {
        self.position.map(|offset| offset + 1)
    }

    /// Returns the kind of problem.
    pub fn kind(&self) -> &RuleErrorKind {
        &self.kind
    }

    /// Returns the suggested fix, when there is one.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid rule \"{}\": {}",
            quote_rule(&self.rule),
            self.kind
        )?;
        if let Some(position) = self.position() {
            write!(f, " at byte {position}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleError {}

fn found_suffix(found: &Option<String>) -> String {
    match found {
        Some(found) => format!(", found {found}"),
        None => String::new(),
    }
}

/// Returns the rule for an error message: control characters escaped, and cut after
/// [`MAX_QUOTED_RULE_BYTES`].
fn quote_rule(rule: &str) -> String {
    let mut end = rule.len().min(MAX_QUOTED_RULE_BYTES);
    while !rule.is_char_boundary(end) {
        end -= 1;
    }
    let mut quoted = String::with_capacity(end + 3);
    for c in rule[..end].chars() {
        if c.is_control() {
            quoted.extend(c.escape_default());
        } else {
            quoted.push(c);
        }
    }
    if end < rule.len() {
        quoted.push_str("...");
    }
    quoted
}

/// Returns the text inside the quotes when the whole rule is wrapped in `'…'` or `"…"`.
fn strip_outer_quotes(rule: &str) -> Option<&str> {
    let quote = rule.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    if rule.len() >= 2 && rule.ends_with(quote) {
        Some(&rule[1..rule.len() - 1])
    } else {
        None
    }
}

/// Returns `text` with each span replaced by `replace(span text)`. Spans are sorted and
/// disjoint, and they start and end at ASCII delimiters.
fn replace_spans(text: &str, spans: &[Span], replace: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len() + 2 * spans.len());
    let mut copied = 0;
    for span in spans {
        let (Some(before), Some(inner)) =
            (text.get(copied..span.start), text.get(span.start..span.end))
        else {
            continue;
        };
        out.push_str(before);
        out.push_str(&replace(inner));
        copied = span.end;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out
}

// ---------------------------------------------------------------------------------------------
// Syntax: the rule as written, before matchers are checked and compiled.
// ---------------------------------------------------------------------------------------------

/// A byte range of the rule, 0-based and end-exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// A rule as written. `And` and `Or` hold a chain: the first operand and the others.
enum Syntax<'r> {
    And(Box<Syntax<'r>>, Vec<Syntax<'r>>),
    Or(Box<Syntax<'r>>, Vec<Syntax<'r>>),
    Not(Box<Syntax<'r>>),
    Call(Call<'r>),
}

struct Call<'r> {
    name: &'r str,
    start: usize,
    args: Vec<Argument>,
}

struct Argument {
    value: String,
    span: Span,
    quoting: Quoting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    Backtick,
    Double,
    Single,
    Bare,
}

/// A recursive-descent parser over the bytes of the rule. Every delimiter is ASCII, so every
/// position it stops at is a character boundary.
struct Parser<'r> {
    rule: &'r str,
    bytes: &'r [u8],
    pos: usize,
    depth: usize,
    single_quoted: Vec<Span>,
    bare: Vec<Span>,
}

impl<'r> Parser<'r> {
    fn new(rule: &'r str) -> Self {
        Parser {
            rule,
            bytes: rule.as_bytes(),
            pos: 0,
            depth: 0,
            single_quoted: Vec::new(),
            bare: Vec::new(),
        }
    }

    fn parse_rule(&mut self) -> Result<Syntax<'r>, RuleError> {
        let syntax = self.parse_or()?;
        self.skip_whitespace();
        if self.pos < self.bytes.len() {
            return Err(self.unexpected("'&&', '||' or the end of the rule"));
        }
        Ok(syntax)
    }

    fn parse_or(&mut self) -> Result<Syntax<'r>, RuleError> {
        let first = self.parse_and()?;
        let mut rest = Vec::new();
        loop {
            self.skip_whitespace();
            if self.eat("||") {
                rest.push(self.parse_and()?);
            } else if self.peek() == Some(b'|') {
                return Err(self.unexpected("'||'"));
            } else {
                break;
            }
        }
        Ok(chain(first, rest, Syntax::Or))
    }

    fn parse_and(&mut self) -> Result<Syntax<'r>, RuleError> {
        let first = self.parse_unary()?;
        let mut rest = Vec::new();
        loop {
            self.skip_whitespace();
            if self.eat("&&") {
                rest.push(self.parse_unary()?);
            } else if self.peek() == Some(b'&') {
                return Err(self.unexpected("'&&'"));
            } else {
                break;
            }
        }
        Ok(chain(first, rest, Syntax::And))
    }

    fn parse_unary(&mut self) -> Result<Syntax<'r>, RuleError> {
        self.skip_whitespace();
        if self.peek() != Some(b'!') {
            return self.parse_primary();
        }
        self.enter()?;
        self.pos += 1;
        let operand = self.parse_unary()?;
        self.depth -= 1;
        Ok(Syntax::Not(Box::new(operand)))
    }

    fn parse_primary(&mut self) -> Result<Syntax<'r>, RuleError> {
        match self.peek() {
            Some(b'(') => {
                self.enter()?;
                self.pos += 1;
                let inner = self.parse_or()?;
                self.skip_whitespace();
                if !self.eat(")") {
                    let expected = if self.at_end() {
                        "')'"
                    } else {
                        "'&&', '||' or ')'"
                    };
                    return Err(self.unexpected(expected));
                }
                self.depth -= 1;
                Ok(inner)
            }
            Some(c) if c.is_ascii_alphabetic() => self.parse_call(),
            _ => Err(self.unexpected("a matcher such as Host(`example.com`), '!' or '('")),
        }
    }

    fn parse_call(&mut self) -> Result<Syntax<'r>, RuleError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.pos += 1;
        }
        let name = self.rule.get(start..self.pos).unwrap_or_default();
        self.skip_whitespace();
        if !self.eat("(") {
            return Err(self.unexpected("'(' after the matcher name"));
        }

        let mut args = Vec::new();
        loop {
            self.skip_whitespace();
            if self.eat(")") {
                break;
            }
            args.push(self.parse_argument()?);
            self.skip_whitespace();
            if self.eat(",") {
                continue;
            }
            if self.eat(")") {
                break;
            }
            let expected = if self.at_end() { "')'" } else { "',' or ')'" };
            return Err(self.unexpected(expected));
        }
        Ok(Syntax::Call(Call { name, start, args }))
    }

    fn parse_argument(&mut self) -> Result<Argument, RuleError> {
        let start = self.pos;
        let (value, quoting) = match self.peek() {
            Some(b'`') => (self.parse_raw_string()?, Quoting::Backtick),
            Some(b'"') => (self.parse_interpreted_string()?, Quoting::Double),
            Some(b'\'') => (self.parse_single_quoted()?, Quoting::Single),
            None | Some(b',' | b')' | b'(') => {
                return Err(self.unexpected("an argument such as `example.com`"));
            }
            Some(_) => (self.parse_bare(), Quoting::Bare),
        };
        let span = Span {
            start,
            end: self.pos,
        };
        match quoting {
            Quoting::Single => self.single_quoted.push(span),
            Quoting::Bare => self.bare.push(span),
            Quoting::Backtick | Quoting::Double => {}
        }
        Ok(Argument {
            value,
            span,
            quoting,
        })
    }

    /// Parses a Go raw string: no escapes, and carriage returns are dropped as Go does.
    fn parse_raw_string(&mut self) -> Result<String, RuleError> {
        let start = self.pos;
        let close = self.find_byte(b'`', start + 1).ok_or_else(|| {
            self.error(
                start,
                RuleErrorKind::UnterminatedString { quote: "backtick" },
            )
        })?;
        self.pos = close + 1;
        let content = self.rule.get(start + 1..close).unwrap_or_default();
        Ok(content.replace('\r', ""))
    }

    fn parse_single_quoted(&mut self) -> Result<String, RuleError> {
        let start = self.pos;
        let close = self.find_byte(b'\'', start + 1).ok_or_else(|| {
            self.error(
                start,
                RuleErrorKind::UnterminatedString {
                    quote: "single-quoted",
                },
            )
        })?;
        self.pos = close + 1;
        Ok(self
            .rule
            .get(start + 1..close)
            .unwrap_or_default()
            .to_owned())
    }

    /// Parses a Go interpreted string literal with its escape sequences.
    fn parse_interpreted_string(&mut self) -> Result<String, RuleError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None | Some(b'\n') => {
                    let kind = RuleErrorKind::UnterminatedString {
                        quote: "double-quoted",
                    };
                    return Err(self.error(start, kind));
                }
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => self.parse_escape(&mut out)?,
                Some(byte) => {
                    out.push(byte);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.error(start, RuleErrorKind::InvalidUtf8))
    }

    fn parse_escape(&mut self, out: &mut Vec<u8>) -> Result<(), RuleError> {
        let start = self.pos;
        let Some(letter) = self.bytes.get(start + 1).copied() else {
            let kind = RuleErrorKind::UnterminatedString {
                quote: "double-quoted",
            };
            return Err(self.error(start, kind));
        };
        self.pos += 2;
        let simple = match letter {
            b'a' => Some(0x07),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'v' => Some(0x0b),
            b'\\' => Some(b'\\'),
            b'"' => Some(b'"'),
            _ => None,
        };
        if let Some(byte) = simple {
            out.push(byte);
            return Ok(());
        }

        let value = match letter {
            b'x' => self.parse_digits(start, 2, 16)?,
            b'u' => self.parse_digits(start, 4, 16)?,
            b'U' => self.parse_digits(start, 8, 16)?,
            b'0'..=b'7' => {
                self.pos -= 1;
                self.parse_digits(start, 3, 8)?
            }
            _ => {
                let letter_length = self
                    .rule
                    .get(start + 1..)
                    .and_then(|rest| rest.chars().next());
                let end = start + 1 + letter_length.map_or(1, char::len_utf8);
                return Err(self.invalid_escape(start, end));
            }
        };
        if matches!(letter, b'x' | b'0'..=b'7') {
            let byte = u8::try_from(value).map_err(|_| self.invalid_escape(start, self.pos))?;
            out.push(byte);
        } else {
            let c = char::from_u32(value).ok_or_else(|| self.invalid_escape(start, self.pos))?;
            let mut buffer = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
        }
        Ok(())
    }

    fn parse_digits(&mut self, start: usize, count: usize, radix: u32) -> Result<u32, RuleError> {
        let mut value: u32 = 0;
        for _ in 0..count {
            let digit = self
                .peek()
                .and_then(|byte| char::from(byte).to_digit(radix))
                .ok_or_else(|| self.invalid_escape(start, self.pos + 1))?;
            value = value * radix + digit;
            self.pos += 1;
        }
        Ok(value)
    }

    fn invalid_escape(&self, start: usize, end: usize) -> RuleError {
        let end = end.min(self.bytes.len());
        let sequence = String::from_utf8_lossy(self.bytes.get(start..end).unwrap_or_default());
        self.error(
            start,
            RuleErrorKind::InvalidEscape {
                sequence: sequence.into_owned(),
            },
        )
        .with_hint("use a backtick string to write backslashes literally".to_owned())
    }

    /// Parses an unquoted argument up to the next delimiter.
    fn parse_bare(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(|c| {
            !c.is_ascii_whitespace() && !matches!(c, b',' | b'(' | b')' | b'`' | b'"' | b'\'')
        }) {
            self.pos += 1;
        }
        self.rule
            .get(start..self.pos)
            .unwrap_or_default()
            .to_owned()
    }

    fn enter(&mut self) -> Result<(), RuleError> {
        if self.depth >= MAX_NESTING {
            return Err(self.error(self.pos, RuleErrorKind::TooDeep { max: MAX_NESTING }));
        }
        self.depth += 1;
        Ok(())
    }

    fn skip_whitespace(&mut self) {
        while self
            .peek()
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn eat(&mut self, token: &str) -> bool {
        let matched = self
            .bytes
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(token.as_bytes()));
        if matched {
            self.pos += token.len();
        }
        matched
    }

    fn find_byte(&self, byte: u8, from: usize) -> Option<usize> {
        let rest = self.bytes.get(from..)?;
        rest.iter()
            .position(|c| *c == byte)
            .map(|offset| from + offset)
    }

    fn unexpected(&self, expected: &'static str) -> RuleError {
        let found = self
            .rule
            .get(self.pos..)
            .and_then(|rest| rest.chars().next())
            .map(|c| {
                if c.is_control() {
                    format!("'{}'", c.escape_default())
                } else {
                    format!("'{c}'")
                }
            });
        self.error(self.pos, RuleErrorKind::Unexpected { expected, found })
    }

    fn error(&self, offset: usize, kind: RuleErrorKind) -> RuleError {
        RuleError::new(self.rule, Some(offset), kind)
    }
}

fn chain<'r>(
    first: Syntax<'r>,
    rest: Vec<Syntax<'r>>,
    wrap: fn(Box<Syntax<'r>>, Vec<Syntax<'r>>) -> Syntax<'r>,
) -> Syntax<'r> {
    if rest.is_empty() {
        first
    } else {
        wrap(Box::new(first), rest)
    }
}

// ---------------------------------------------------------------------------------------------
// Building: resolving matcher names, checking arguments and compiling expressions.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    HostRegexp,
    Path,
    PathPrefix,
    PathRegexp,
    Method,
    Header,
    HeaderRegexp,
    Query,
    QueryRegexp,
    ClientIp,
}

/// Matcher names as Traefik v3 spells them.
const MATCHER_NAMES: &[(&str, Kind)] = &[
    ("Host", Kind::Host),
    ("HostRegexp", Kind::HostRegexp),
    ("Path", Kind::Path),
    ("PathPrefix", Kind::PathPrefix),
    ("PathRegexp", Kind::PathRegexp),
    ("Method", Kind::Method),
    ("Header", Kind::Header),
    ("HeaderRegexp", Kind::HeaderRegexp),
    ("Query", Kind::Query),
    ("QueryRegexp", Kind::QueryRegexp),
    ("ClientIP", Kind::ClientIp),
];

/// Matcher names that only Traefik v2 accepts.
const V2_MATCHER_NAMES: &[(&str, Kind)] = &[
    ("HostHeader", Kind::Host),
    ("Headers", Kind::Header),
    ("HeadersRegexp", Kind::HeaderRegexp),
];

/// Matchers of Traefik's TCP routers, named in the unknown-matcher hint.
const TCP_MATCHER_NAMES: &[&str] = &["HostSNI", "HostSNIRegexp", "ALPN"];

/// Returns the kind of matcher `name`, accepted in the four spellings that Traefik's parser
/// registers: as listed, lower case, upper case, and with only the first letter in upper case.
fn lookup_matcher(name: &str) -> Option<Kind> {
    MATCHER_NAMES
        .iter()
        .chain(V2_MATCHER_NAMES)
        .find(|(canonical, _)| {
            name == *canonical
                || name == canonical.to_ascii_lowercase()
                || name == canonical.to_ascii_uppercase()
                || name == title_case(canonical)
        })
        .map(|(_, kind)| *kind)
}

fn title_case(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let mut chars = lower.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

struct Builder<'r> {
    rule: &'r str,
    bare: &'r [Span],
}

impl Builder<'_> {
    fn build(&self, syntax: Syntax<'_>) -> Result<Expr, RuleError> {
        match syntax {
            Syntax::And(first, rest) => Ok(balance(
                self.build(*first)?,
                self.build_all(rest)?,
                Expr::And,
            )),
            Syntax::Or(first, rest) => Ok(balance(
                self.build(*first)?,
                self.build_all(rest)?,
                Expr::Or,
            )),
            Syntax::Not(operand) => Ok(Expr::Not(Box::new(self.build(*operand)?))),
            Syntax::Call(call) => self.build_call(call),
        }
    }

    fn build_all(&self, operands: Vec<Syntax<'_>>) -> Result<Vec<Expr>, RuleError> {
        operands
            .into_iter()
            .map(|operand| self.build(operand))
            .collect()
    }

    fn build_call(&self, call: Call<'_>) -> Result<Expr, RuleError> {
        let Some(kind) = lookup_matcher(call.name) else {
            return Err(self.unknown_matcher(&call));
        };
        let name = call.name;

        let bare_allowed = |arg: &Argument| kind == Kind::Host && is_bare_host(&arg.value);
        if let Some(arg) = call
            .args
            .iter()
            .find(|a| a.quoting == Quoting::Bare && !bare_allowed(a))
        {
            let corrected = replace_spans(self.rule, self.bare, |text| format!("`{text}`"));
            let kind = RuleErrorKind::UnquotedArgument {
                matcher: name.to_owned(),
                argument: arg.value.clone(),
            };
            return Err(self
                .error(arg.span.start, kind)
                .with_hint(format!("write {corrected}")));
        }
        self.check_argument_count(&call, kind)?;

        let args = &call.args;
        let matcher = match kind {
            Kind::Host => {
                let patterns = args
                    .iter()
                    .map(|a| self.host_pattern(name, a))
                    .collect::<Result<_, _>>()?;
                Matcher::Host(patterns)
            }
            Kind::HostRegexp => {
                let patterns = args
                    .iter()
                    .map(|a| self.host_regex(a))
                    .collect::<Result<_, _>>()?;
                Matcher::HostRegexp(patterns)
            }
            Kind::Path | Kind::PathPrefix => return self.build_path(name, kind, args),
            Kind::PathRegexp => {
                let patterns = args
                    .iter()
                    .map(|a| self.compile(&a.value, a.span))
                    .collect::<Result<_, _>>()?;
                Matcher::PathRegexp(patterns)
            }
            Kind::Method => {
                let methods = args
                    .iter()
                    .map(|a| self.method(name, a))
                    .collect::<Result<_, _>>()?;
                Matcher::Method(methods)
            }
            Kind::Header => Matcher::Header {
                name: self.header_name(name, &args[0])?,
                value: args[1].value.clone(),
            },
            Kind::HeaderRegexp => Matcher::HeaderRegexp {
                name: self.header_name(name, &args[0])?,
                pattern: self.compile_bytes(&args[1].value, args[1].span)?,
            },
            Kind::Query => return self.build_query(name, args),
            Kind::QueryRegexp => Matcher::QueryRegexp {
                key: self.non_empty(name, &args[0])?,
                pattern: self.compile_bytes(&args[1].value, args[1].span)?,
            },
            Kind::ClientIp => {
                let networks = args
                    .iter()
                    .map(|a| self.client_ip(a))
                    .collect::<Result<_, _>>()?;
                Matcher::ClientIp(networks)
            }
        };
        Ok(Expr::Matcher(matcher))
    }

    fn unknown_matcher(&self, call: &Call<'_>) -> RuleError {
        let names: Vec<&str> = MATCHER_NAMES.iter().map(|(name, _)| *name).collect();
        let mut hint = String::new();
        if let Some((canonical, _)) = MATCHER_NAMES
            .iter()
            .chain(V2_MATCHER_NAMES)
            .find(|(canonical, _)| canonical.eq_ignore_ascii_case(call.name))
        {
            hint.push_str(&format!("did you mean {canonical}? "));
        } else if let Some(tcp) = TCP_MATCHER_NAMES
            .iter()
            .find(|tcp| tcp.eq_ignore_ascii_case(call.name))
        {
            hint.push_str(&format!(
                "{tcp} is a matcher of TCP routers, which are not supported; "
            ));
        }
        hint.push_str(&format!(
            "valid matchers are {} (v2 also accepts HostHeader, Headers and HeadersRegexp), each \
             written as listed, in lower case, in upper case or with only the first letter in \
             upper case",
            names.join(", ")
        ));
        let kind = RuleErrorKind::UnknownMatcher {
            name: call.name.to_owned(),
        };
        self.error(call.start, kind).with_hint(hint)
    }

    fn check_argument_count(&self, call: &Call<'_>, kind: Kind) -> Result<(), RuleError> {
        let found = call.args.len();
        let (valid, expected) = match kind {
            Kind::Header | Kind::HeaderRegexp | Kind::QueryRegexp => (found == 2, "2 arguments"),
            _ => (found >= 1, "at least 1 argument"),
        };
        if valid {
            return Ok(());
        }
        let kind = RuleErrorKind::ArgumentCount {
            matcher: call.name.to_owned(),
            expected,
            found,
        };
        Err(self.error(call.start, kind))
    }

    fn host_pattern(&self, matcher: &str, arg: &Argument) -> Result<HostPattern, RuleError> {
        let written = arg.value.as_str();
        if written.is_empty() {
            return Err(self.empty_argument(matcher, arg));
        }
        if !written.is_ascii() {
            let kind = RuleErrorKind::NonAsciiHost {
                host: written.to_owned(),
            };
            return Err(self
                .error(arg.span.start, kind)
                .with_hint("write the name in punycode (xn--...)".to_owned()));
        }
        if written == "*" {
            return Ok(HostPattern::Any);
        }

        let lower = written.to_ascii_lowercase();
        let unbracketed = lower
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(&lower);
        let host = unbracketed.strip_suffix('.').unwrap_or(unbracketed);
        let invalid = |reason: &str| {
            let kind = RuleErrorKind::InvalidHost {
                host: written.to_owned(),
                reason: reason.to_owned(),
            };
            self.error(arg.span.start, kind)
        };

        if host.contains(':') {
            if host.parse::<std::net::Ipv6Addr>().is_ok() {
                return Ok(HostPattern::Exact(host.to_owned()));
            }
            let without_port = host.rsplit_once(':').map_or(host, |(name, _)| name);
            return Err(invalid("the request host never includes a port")
                .with_hint(format!("write {matcher}(`{without_port}`)")));
        }
        if let Some(bad) = host.chars().find(|c| !is_host_char(*c)) {
            return Err(invalid(&format!(
                "'{}' cannot appear in a host name",
                bad.escape_default()
            )));
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') || suffix.starts_with('.') {
                return Err(invalid("a wildcard must be written *.example.com"));
            }
            return Ok(HostPattern::Wildcard(suffix.to_owned()));
        }
        if host.contains('{') {
            return Err(invalid("Host takes no placeholders").with_hint(
                "use HostRegexp for v2 templates such as {sub:[a-z]+}.example.com".to_owned(),
            ));
        }
        if host.contains('*') {
            return Err(invalid(
                "'*' is only accepted as the whole first label, as in *.example.com",
            ));
        }
        if host.is_empty() || host.starts_with('.') || host.contains("..") {
            return Err(invalid("empty label"));
        }
        Ok(HostPattern::Exact(host.to_owned()))
    }

    fn host_regex(&self, arg: &Argument) -> Result<Regex, RuleError> {
        match self.convert_template(arg, "[^.]+", true)? {
            Some(converted) => self.compile(&converted, arg.span),
            None => self.compile(&arg.value, arg.span),
        }
    }

    fn build_path(&self, matcher: &str, kind: Kind, args: &[Argument]) -> Result<Expr, RuleError> {
        let mut literals = Vec::new();
        let mut templates = Vec::new();
        for arg in args {
            if !arg.value.starts_with('/') {
                let error_kind = RuleErrorKind::RelativePath {
                    matcher: matcher.to_owned(),
                    path: arg.value.clone(),
                };
                return Err(self
                    .error(arg.span.start, error_kind)
                    .with_hint(format!("write {matcher}(`/{}`)", arg.value)));
            }
            match self.convert_template(arg, "[^/]+", kind == Kind::Path)? {
                Some(converted) => templates.push(self.compile(&converted, arg.span)?),
                None => literals.push(arg.value.clone()),
            }
        }

        let literal_matcher = match kind {
            Kind::Path => Matcher::Path(literals.clone()),
            _ => Matcher::PathPrefix(literals.clone()),
        };
        let expr = match (literals.is_empty(), templates.is_empty()) {
            (false, true) => Expr::Matcher(literal_matcher),
            (true, false) => Expr::Matcher(Matcher::PathRegexp(templates)),
            _ => Expr::Or(
                Box::new(Expr::Matcher(literal_matcher)),
                Box::new(Expr::Matcher(Matcher::PathRegexp(templates))),
            ),
        };
        Ok(expr)
    }

    fn method(&self, matcher: &str, arg: &Argument) -> Result<String, RuleError> {
        if arg.value.is_empty() {
            return Err(self.empty_argument(matcher, arg));
        }
        if !arg.value.bytes().all(is_token_byte) {
            let kind = RuleErrorKind::InvalidMethod {
                method: arg.value.clone(),
            };
            return Err(self.error(arg.span.start, kind));
        }
        Ok(arg.value.to_ascii_uppercase())
    }

    fn header_name(&self, matcher: &str, arg: &Argument) -> Result<String, RuleError> {
        if arg.value.is_empty() {
            return Err(self.empty_argument(matcher, arg));
        }
        if !arg.value.bytes().all(is_token_byte) {
            let kind = RuleErrorKind::InvalidHeaderName {
                name: arg.value.clone(),
            };
            return Err(self.error(arg.span.start, kind));
        }
        Ok(arg.value.clone())
    }

    /// Builds `Query`. One or two arguments whose first has no `=` are the v3 form
    /// `Query(k[, v])`. Otherwise every argument must be a v2 `k=v` pair and all pairs must
    /// match, because Traefik v2 passed them to gorilla/mux `Route.Queries`. That function also
    /// reads an empty value (`k=`) as any value.
    fn build_query(&self, matcher: &str, args: &[Argument]) -> Result<Expr, RuleError> {
        let first = &args[0];
        if !first.value.contains('=') && args.len() <= 2 {
            let value = args.get(1).map_or_else(String::new, |a| a.value.clone());
            let key = self.non_empty(matcher, first)?;
            return Ok(Expr::Matcher(Matcher::Query {
                key,
                value: Some(value),
            }));
        }

        let pair = |arg: &Argument| {
            let Some((key, value)) = arg.value.split_once('=') else {
                let kind = RuleErrorKind::InvalidQueryPair {
                    argument: arg.value.clone(),
                };
                let hint = "write every argument of the v2 form as key=value, or use the v3 form \
                            Query(`key`, `value`)";
                return Err(self.error(arg.span.start, kind).with_hint(hint.to_owned()));
            };
            let value = Some(value.to_owned()).filter(|value| !value.is_empty());
            if key.is_empty() {
                return Err(self.empty_argument(matcher, arg));
            }
            Ok(Expr::Matcher(Matcher::Query {
                key: key.to_owned(),
                value,
            }))
        };
        let rest = args[1..].iter().map(pair).collect::<Result<_, _>>()?;
        Ok(balance(pair(first)?, rest, Expr::And))
    }

    fn client_ip(&self, arg: &Argument) -> Result<IpNet, RuleError> {
        let value = arg.value.as_str();
        if let Ok(network) = IpNet::from_str(value) {
            return Ok(network);
        }
        if let Ok(ip) = IpAddr::from_str(value) {
            return Ok(IpNet::from(ip));
        }
        let kind = RuleErrorKind::InvalidClientIp {
            value: value.to_owned(),
        };
        Err(self.error(arg.span.start, kind))
    }

    fn non_empty(&self, matcher: &str, arg: &Argument) -> Result<String, RuleError> {
        if arg.value.is_empty() {
            return Err(self.empty_argument(matcher, arg));
        }
        Ok(arg.value.clone())
    }

    /// Converts a v2 gorilla/mux template such as `{sub:[a-z]+}.example.com` into an anchored
    /// expression: literal parts escaped, `{name:re}` as `(?:re)` and `{name}` as `default`.
    /// Returns `None` when the argument has no placeholder. A brace that does not open
    /// `{name` followed by `}` or `:` is literal, so repetitions such as `[a-z]{2,3}` stay.
    fn convert_template(
        &self,
        arg: &Argument,
        default: &str,
        anchor_end: bool,
    ) -> Result<Option<String>, RuleError> {
        let text = arg.value.as_str();
        let bytes = text.as_bytes();
        let mut converted = String::from("^");
        let mut literal_start = 0;
        let mut found = false;
        let mut i = 0;
        while i < bytes.len() {
            let Some(name_end) = placeholder_name_end(bytes, i) else {
                i += 1;
                continue;
            };
            found = true;
            converted.push_str(&regex::escape(&text[literal_start..i]));

            if bytes[name_end] == b'}' {
                converted.push_str(default);
                i = name_end + 1;
            } else {
                let pattern_start = name_end + 1;
                let close = matching_brace(bytes, pattern_start).ok_or_else(|| {
                    let kind = RuleErrorKind::UnclosedPlaceholder {
                        value: text.to_owned(),
                    };
                    self.error(arg.span.start, kind)
                })?;
                converted.push_str("(?:");
                converted.push_str(&text[pattern_start..close]);
                converted.push(')');
                i = close + 1;
            }
            literal_start = i;
        }
        if !found {
            return Ok(None);
        }
        converted.push_str(&regex::escape(&text[literal_start..]));
        if anchor_end {
            converted.push('$');
        }
        Ok(Some(converted))
    }

    fn compile(&self, pattern: &str, span: Span) -> Result<Regex, RuleError> {
        RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|error| self.regex_error(pattern, span, &error))
    }

    fn compile_bytes(&self, pattern: &str, span: Span) -> Result<regex::bytes::Regex, RuleError> {
        regex::bytes::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|error| self.regex_error(pattern, span, &error))
    }

    fn regex_error(&self, pattern: &str, span: Span, error: &regex::Error) -> RuleError {
        let reason = match error {
            regex::Error::Syntax(text) => text
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("error: "))
                .unwrap_or(text)
                .trim()
                .to_owned(),
            regex::Error::CompiledTooBig(limit) => {
                format!("the compiled expression is larger than the limit of {limit} bytes")
            }
            other => other.to_string(),
        };
        let kind = RuleErrorKind::InvalidRegex {
            pattern: pattern.to_owned(),
            reason,
        };
        self.error(span.start, kind)
    }

    fn empty_argument(&self, matcher: &str, arg: &Argument) -> RuleError {
        let kind = RuleErrorKind::EmptyArgument {
            matcher: matcher.to_owned(),
        };
        self.error(arg.span.start, kind)
    }

    fn error(&self, offset: usize, kind: RuleErrorKind) -> RuleError {
        RuleError::new(self.rule, Some(offset), kind)
    }
}

/// Combines a chain of operands into a balanced tree, keeping their left-to-right order.
fn balance(first: Expr, mut rest: Vec<Expr>, combine: fn(Box<Expr>, Box<Expr>) -> Expr) -> Expr {
    if rest.is_empty() {
        return first;
    }
    // `first` and `rest[..left_rest]` form the left half, the other operands the right half.
    let left_rest = rest.len().div_ceil(2).saturating_sub(1);
    let right = rest.split_off(left_rest);
    let left = balance(first, rest, combine);
    let mut right = right.into_iter();
    match right.next() {
        Some(right_first) => {
            let right = balance(right_first, right.collect(), combine);
            combine(Box::new(left), Box::new(right))
        }
        None => left,
    }
}

/// Returns the index of the `}` or `:` that ends a placeholder name starting at `bytes[open]`,
/// or `None` when `bytes[open]` does not open a placeholder.
fn placeholder_name_end(bytes: &[u8], open: usize) -> Option<usize> {
    if bytes.get(open) != Some(&b'{') {
        return None;
    }
    let first = *bytes.get(open + 1)?;
    if !(first.is_ascii_alphabetic() || first == b'_') {
        return None;
    }
    let mut end = open + 2;
    while bytes
        .get(end)
        .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
    {
        end += 1;
    }
    matches!(bytes.get(end), Some(b'}' | b':')).then_some(end)
}

/// Returns the index of the `}` that closes a placeholder whose pattern starts at `start`,
/// counting nested braces such as the ones in `{id:[0-9]{2}}`.
fn matching_brace(bytes: &[u8], start: usize) -> Option<usize> {
    let mut level = 1usize;
    for (offset, byte) in bytes.get(start..)?.iter().enumerate() {
        match byte {
            b'{' => level += 1,
            b'}' => {
                level -= 1;
                if level == 0 {
                    return Some(start + offset);
                }
            }
            _ => {}
        }
    }
    None
}

/// Returns whether an unquoted argument is accepted as a host: the platform's documentation
/// writes `Host(example.com,www.example.com)`.
fn is_bare_host(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'*' | b'_' | b'-'))
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*' | '{' | '}')
}

/// Returns whether `byte` may appear in an HTTP token (RFC 9110 `tchar`).
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Returns the forms under which a peer address may match: itself, and its IPv4 or
/// IPv4-mapped IPv6 counterpart, so `::ffff:10.0.0.1` matches `10.0.0.0/8` and the reverse.
fn ip_forms(ip: IpAddr) -> [IpAddr; 2] {
    match ip {
        IpAddr::V4(v4) => [ip, IpAddr::V6(v4.to_ipv6_mapped())],
        IpAddr::V6(v6) => [ip, v6.to_ipv4_mapped().map_or(ip, IpAddr::V4)],
    }
}

/// Calls `f` on the decoded value of each query parameter named `key`, returning true as soon
/// as `f` does. Parameters are split on `&` and then on the first `=`, with `+` as a space and
/// percent-escapes decoded. Like Go's `url.ParseQuery`, which Traefik uses, a parameter with an
/// invalid escape or a `;` is skipped.
fn for_each_query_value(query: &str, key: &str, mut f: impl FnMut(&[u8]) -> bool) -> bool {
    for parameter in query.split('&') {
        if parameter.is_empty() || parameter.contains(';') {
            continue;
        }
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        if percent_decode(name).is_none_or(|name| name.as_ref() != key.as_bytes()) {
            continue;
        }
        if let Some(value) = percent_decode(value) {
            if f(&value) {
                return true;
            }
        }
    }
    false
}

/// Decodes `+` and percent-escapes of a query component. Returns `None` on an invalid escape.
fn percent_decode(text: &str) -> Option<Cow<'_, [u8]>> {
    if !text.contains(['%', '+']) {
        return Some(Cow::Borrowed(text.as_bytes()));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let high = char::from(*bytes.get(i + 1)?).to_digit(16)?;
                let low = char::from(*bytes.get(i + 2)?).to_digit(16)?;
                out.push(u8::try_from(high * 16 + low).ok()?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A request with the fields that rules look at.
    struct FakeRequest {
        host: String,
        path: String,
        method: String,
        query: String,
        client_ip: IpAddr,
        headers: Vec<(String, Vec<u8>)>,
    }

    impl FakeRequest {
        fn new(host: &str, path: &str) -> Self {
            FakeRequest {
                host: host.to_owned(),
                path: path.to_owned(),
                method: "GET".to_owned(),
                query: String::new(),
                client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                headers: Vec::new(),
            }
        }

        fn method(mut self, method: &str) -> Self {
            self.method = method.to_owned();
            self
        }

        fn query(mut self, query: &str) -> Self {
            self.query = query.to_owned();
            self
        }

        fn client_ip(mut self, ip: IpAddr) -> Self {
            self.client_ip = ip;
            self
        }

        fn header(mut self, name: &str, value: &[u8]) -> Self {
            self.headers.push((name.to_owned(), value.to_vec()));
            self
        }
    }

    impl RequestView for FakeRequest {
        fn host(&self) -> &str {
            &self.host
        }

        fn path(&self) -> &str {
            &self.path
        }

        fn method(&self) -> &str {
            &self.method
        }

        fn query(&self) -> &str {
            &self.query
        }

        fn client_ip(&self) -> IpAddr {
            self.client_ip
        }

        fn header_values(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
            self.headers
                .iter()
                .filter(|(header, _)| header.eq_ignore_ascii_case(name))
                .any(|(_, value)| f(value))
        }
    }

    fn rule(text: &str) -> Expr {
        match parse(text) {
            Ok(expr) => expr,
            Err(error) => panic!("rule {text:?} failed to parse: {error}"),
        }
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(expr) => panic!("rule {text:?} parsed as {expr:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn host(host: &str) -> FakeRequest {
        FakeRequest::new(host, "/")
    }

    fn path(path: &str) -> FakeRequest {
        FakeRequest::new("example.com", path)
    }

    #[test]
    fn backtick_and_double_quotes_agree() {
        let request = path("/api");
        assert!(rule("PathPrefix(`/api`)").matches(&request));
        assert!(rule("PathPrefix(\"/api\")").matches(&request));
    }

    #[test]
    fn double_quoted_escapes_decode() {
        let request = FakeRequest::new("example.com", "/a\"b\\c\té!");
        assert!(rule(r#"Path("/a\"b\\c\t\u00e9\x21")"#).matches(&request));
        assert!(rule(r#"Path("/a\"b\\c\t\U000000e9\041")"#).matches(&request));
    }

    #[test]
    fn invalid_escape_suggests_backticks() {
        assert_eq!(
            error(r#"PathRegexp("^/a\.b")"#),
            "invalid rule \"PathRegexp(\"^/a\\.b\")\": invalid escape sequence \\. in \
             double-quoted string at byte 16; use a backtick string to write backslashes \
             literally"
        );
    }

    #[test]
    fn host_matches_case_and_port_stripped() {
        let expr = rule("Host(`Shop.Example.COM`)");
        assert!(expr.matches(&host("shop.example.com")));
        assert!(!expr.matches(&host("example.com")));
        assert!(!expr.matches(&host("")));
    }

    #[test]
    fn host_trailing_dot_is_stripped() {
        assert!(rule("Host(`app.example.com.`)").matches(&host("app.example.com")));
    }

    #[test]
    fn host_wildcard_matches_one_label() {
        let expr = rule("Host(`*.example.com`)");
        assert!(expr.matches(&host("a.example.com")));
        assert!(!expr.matches(&host("example.com")));
        assert!(!expr.matches(&host("a.b.example.com")));
        assert!(!expr.matches(&host(".example.com")));
        assert!(!expr.matches(&host("aexample.com")));
    }

    #[test]
    fn host_star_matches_every_request() {
        let expr = rule("Host(`*`)");
        assert!(expr.matches(&host("")));
        assert!(expr.matches(&host("anything.test")));
    }

    #[test]
    fn host_accepts_bare_arguments() {
        let expr = rule("Host(example.com,www.example.com)");
        assert!(expr.matches(&host("example.com")));
        assert!(expr.matches(&host("www.example.com")));
        assert!(!expr.matches(&host("api.example.com")));
    }

    #[test]
    fn host_accepts_ipv6_literals() {
        assert!(rule("Host(`2001:DB8::1`)").matches(&host("2001:db8::1")));
        assert!(rule("Host(`[2001:db8::1]`)").matches(&host("2001:db8::1")));
    }

    #[test]
    fn host_rejects_port_with_hint() {
        assert_eq!(
            error("Host(`example.com:8080`)"),
            "invalid rule \"Host(`example.com:8080`)\": invalid host `example.com:8080`: the \
             request host never includes a port at byte 6; write Host(`example.com`)"
        );
    }

    #[test]
    fn host_rejects_empty_argument() {
        assert_eq!(
            error("Host(``)"),
            "invalid rule \"Host(``)\": empty argument in Host at byte 6"
        );
    }

    #[test]
    fn host_rejects_misplaced_wildcards() {
        assert!(parse("Host(`a.*.example.com`)").is_err());
        assert!(parse("Host(`*example.com`)").is_err());
        assert!(parse("Host(`*.`)").is_err());
    }

    #[test]
    fn precedence_and_binds_tighter() {
        // Host(a) || (Host(b) && Path(/x))
        let expr = rule("Host(`a`) || Host(`b`) && Path(`/x`)");
        assert!(expr.matches(&FakeRequest::new("a", "/other")));
        assert!(!expr.matches(&FakeRequest::new("b", "/other")));
        assert!(expr.matches(&FakeRequest::new("b", "/x")));
    }

    #[test]
    fn parentheses_override_precedence() {
        let expr = rule("(Host(`a`) || Host(`b`)) && Path(`/x`)");
        assert!(!expr.matches(&FakeRequest::new("a", "/other")));
        assert!(expr.matches(&FakeRequest::new("a", "/x")));
    }

    #[test]
    fn not_applies_to_next_operand() {
        let expr = rule("!Host(`a`) && Path(`/x`)");
        assert!(expr.matches(&FakeRequest::new("b", "/x")));
        assert!(!expr.matches(&FakeRequest::new("a", "/x")));
        assert!(!expr.matches(&FakeRequest::new("b", "/y")));
        assert!(rule("! ! Host(`a`)").matches(&host("a")));
    }

    #[test]
    fn whitespace_allowed_between_tokens() {
        let expr = rule(" \n Host ( `a` , `b` ,)\t&&\r\n!  ( Path(`/x`) ) ");
        assert!(expr.matches(&FakeRequest::new("b", "/y")));
    }

    #[test]
    fn matcher_names_accept_four_spellings() {
        for name in ["PathPrefix", "pathprefix", "PATHPREFIX", "Pathprefix"] {
            let text = format!("{name}(`/api`)");
            assert!(rule(&text).matches(&path("/api/v1")), "{name}");
        }
        for name in ["ClientIP", "clientip", "CLIENTIP", "Clientip"] {
            assert!(parse(&format!("{name}(`10.0.0.0/8`)")).is_ok(), "{name}");
        }
    }

    #[test]
    fn mixed_case_name_is_unknown() {
        assert_eq!(
            error("pathPrefix(`/`)"),
            "invalid rule \"pathPrefix(`/`)\": unknown matcher pathPrefix at byte 1; did you \
             mean PathPrefix? valid matchers are Host, HostRegexp, Path, PathPrefix, PathRegexp, \
             Method, Header, HeaderRegexp, Query, QueryRegexp, ClientIP (v2 also accepts \
             HostHeader, Headers and HeadersRegexp), each written as listed, in lower case, in \
             upper case or with only the first letter in upper case"
        );
    }

    #[test]
    fn tcp_matcher_named_in_hint() {
        let message = error("HostSNI(`a`)");
        assert!(
            message.contains("HostSNI is a matcher of TCP routers"),
            "{message}"
        );
    }

    #[test]
    fn v2_aliases_and_several_arguments() {
        let request = FakeRequest::new("b.test", "/two")
            .method("POST")
            .header("X-Env", b"prod");
        assert!(rule("HostHeader(`a.test`, `b.test`)").matches(&request));
        assert!(rule("PathPrefix(`/one`, `/two`)").matches(&request));
        assert!(rule("Method(`GET`, `POST`)").matches(&request));
        assert!(rule("Headers(`X-Env`, `prod`)").matches(&request));
        assert!(rule("HeadersRegexp(`X-Env`, `^pr`)").matches(&request));
        assert!(!rule("Path(`/one`, `/three`)").matches(&request));
    }

    #[test]
    fn host_regexp_is_unanchored() {
        let expr = rule(r"HostRegexp(`example\.com`)");
        assert!(expr.matches(&host("api.example.com")));
        assert!(expr.matches(&host("example.community")));
        let anchored = rule(r"HostRegexp(`^[a-z]+\.example\.com$`)");
        assert!(anchored.matches(&host("api.example.com")));
        assert!(!anchored.matches(&host("a.api.example.com")));
    }

    #[test]
    fn host_regexp_converts_v2_templates() {
        let expr = rule("HostRegexp(`{sub:[a-z]+}.example.com`)");
        assert!(expr.matches(&host("api.example.com")));
        assert!(!expr.matches(&host("apixexample.com")));
        assert!(!expr.matches(&host("api.example.com.evil")));
        let plain = rule("HostRegexp(`{sub}.example.com`)");
        assert!(plain.matches(&host("api.example.com")));
        assert!(!plain.matches(&host("a.b.example.com")));
    }

    #[test]
    fn regex_repetition_is_not_template() {
        let expr = rule(r"HostRegexp(`^[a-z]{2,3}\.example\.com$`)");
        assert!(expr.matches(&host("ab.example.com")));
        assert!(!expr.matches(&host("abcd.example.com")));
    }

    #[test]
    fn template_with_nested_braces() {
        let expr = rule("Path(`/item/{id:[0-9]{2}}`)");
        assert!(expr.matches(&path("/item/42")));
        assert!(!expr.matches(&path("/item/421")));
        assert!(parse("Path(`/item/{id:[0-9]`)").is_err());
    }

    #[test]
    fn path_is_exact_match() {
        let expr = rule("Path(`/api`)");
        assert!(expr.matches(&path("/api")));
        assert!(!expr.matches(&path("/api/")));
        assert!(!expr.matches(&path("/ap")));
    }

    #[test]
    fn path_prefix_is_plain_prefix() {
        let expr = rule("PathPrefix(`/products`)");
        assert!(expr.matches(&path("/products-for-sale")));
        assert!(expr.matches(&path("/products")));
        assert!(!expr.matches(&path("/product")));
        assert!(!rule("PathPrefix(`/a.c`)").matches(&path("/abc")));
    }

    #[test]
    fn path_v2_placeholders_convert() {
        let exact = rule("Path(`/route/{id}`)");
        assert!(exact.matches(&path("/route/42")));
        assert!(!exact.matches(&path("/route/42/more")));
        let prefix = rule("PathPrefix(`/users/{id:[0-9]+}`, `/static`)");
        assert!(prefix.matches(&path("/users/7/profile")));
        assert!(prefix.matches(&path("/static/app.js")));
        assert!(!prefix.matches(&path("/users/me")));
    }

    #[test]
    fn path_must_start_with_slash() {
        assert_eq!(
            error("Path(`api`)"),
            "invalid rule \"Path(`api`)\": path `api` of Path does not start with '/' at byte \
             6; write Path(`/api`)"
        );
    }

    #[test]
    fn path_regexp_is_unanchored() {
        let expr = rule(r"PathRegexp(`\.php$`)");
        assert!(expr.matches(&path("/index.php")));
        assert!(!expr.matches(&path("/index.php5")));
    }

    #[test]
    fn method_is_uppercased() {
        let expr = rule("Method(`post`)");
        assert!(expr.matches(&path("/").method("POST")));
        assert!(!expr.matches(&path("/").method("GET")));
    }

    #[test]
    fn header_value_is_case_sensitive() {
        let expr = rule("Header(`x-env`, `Prod`)");
        let request = path("/").header("X-Env", b"dev").header("x-ENV", b"Prod");
        assert!(expr.matches(&request));
        assert!(!expr.matches(&path("/").header("X-Env", b"prod")));
        assert!(!expr.matches(&path("/")));
    }

    #[test]
    fn header_regexp_matches_any_value() {
        let expr = rule("HeaderRegexp(`Accept`, `json$`)");
        assert!(expr.matches(
            &path("/")
                .header("accept", b"text/html")
                .header("Accept", b"application/json")
        ));
        assert!(!expr.matches(&path("/").header("accept", b"text/html")));
        assert!(rule("HeaderRegexp(`X-Raw`, `^a`)").matches(&path("/").header("X-Raw", b"a\xff")));
    }

    #[test]
    fn header_needs_two_arguments() {
        assert_eq!(
            error("Header(`X-Env`)"),
            "invalid rule \"Header(`X-Env`)\": Header takes 2 arguments, found 1 at byte 1"
        );
    }

    #[test]
    fn query_key_and_value_decode() {
        let expr = rule("Query(`q`, `a b&c`)");
        assert!(expr.matches(&path("/").query("x=1&q=a+b%26c")));
        assert!(expr.matches(&path("/").query("q=zzz&q=a%20b%26c")));
        assert!(!expr.matches(&path("/").query("q=a+b")));
        assert!(rule("Query(`a b`, `1`)").matches(&path("/").query("a%20b=1")));
    }

    #[test]
    fn query_key_alone_expects_empty_value() {
        let expr = rule("Query(`debug`)");
        assert!(expr.matches(&path("/").query("debug")));
        assert!(expr.matches(&path("/").query("debug=")));
        assert!(!expr.matches(&path("/").query("debug=1")));
        assert!(!expr.matches(&path("/").query("")));
    }

    #[test]
    fn query_skips_invalid_parameters() {
        let expr = rule("Query(`q`, `1`)");
        assert!(!expr.matches(&path("/").query("q=1;x=2")));
        assert!(!expr.matches(&path("/").query("q=%zz1")));
        assert!(expr.matches(&path("/").query("q=%zz&q=1")));
    }

    #[test]
    fn query_v2_pairs_must_all_match() {
        let expr = rule("Query(`a=1`, `b=2`)");
        assert!(expr.matches(&path("/").query("b=2&a=1")));
        assert!(!expr.matches(&path("/").query("a=1")));
        let presence = rule("Query(`a=1`, `b=`)");
        assert!(presence.matches(&path("/").query("a=1&b=anything")));
        assert!(presence.matches(&path("/").query("a=1&b")));
        assert!(!presence.matches(&path("/").query("a=1")));
    }

    #[test]
    fn query_v2_needs_key_value_pairs() {
        assert_eq!(
            error("Query(`a=1`, `b`)"),
            "invalid rule \"Query(`a=1`, `b`)\": query argument `b` is not a key=value pair at \
             byte 14; write every argument of the v2 form as key=value, or use the v3 form \
             Query(`key`, `value`)"
        );
    }

    #[test]
    fn query_regexp_matches_any_value() {
        let expr = rule("QueryRegexp(`id`, `^[0-9]+$`)");
        assert!(expr.matches(&path("/").query("id=x&id=42")));
        assert!(!expr.matches(&path("/").query("id=x")));
    }

    #[test]
    fn client_ip_address_and_cidr() {
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        let expr = rule("ClientIP(`10.0.0.0/8`, `192.168.1.7`, `2001:db8::/32`)");
        assert!(expr.matches(&path("/").client_ip(v4(10, 1, 2, 3))));
        assert!(expr.matches(&path("/").client_ip(v4(192, 168, 1, 7))));
        assert!(!expr.matches(&path("/").client_ip(v4(192, 168, 1, 8))));
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        assert!(expr.matches(&path("/").client_ip(IpAddr::V6(v6))));
    }

    #[test]
    fn client_ip_matches_mapped_ipv6_peer() {
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped());
        assert!(rule("ClientIP(`10.0.0.0/8`)").matches(&path("/").client_ip(mapped)));
        assert!(!rule("ClientIP(`11.0.0.0/8`)").matches(&path("/").client_ip(mapped)));
    }

    #[test]
    fn client_ip_rejects_invalid_value() {
        assert_eq!(
            error("ClientIP(`10.0.0.300`)"),
            "invalid rule \"ClientIP(`10.0.0.300`)\": invalid IP address or CIDR `10.0.0.300` \
             at byte 10"
        );
    }

    #[test]
    fn missing_parenthesis_reports_position() {
        assert_eq!(
            error("Host(`a`"),
            "invalid rule \"Host(`a`\": expected ')' at byte 9"
        );
    }

    #[test]
    fn unexpected_token_named() {
        assert_eq!(
            error("Host(`a`) & Path(`/`)"),
            "invalid rule \"Host(`a`) & Path(`/`)\": expected '&&', found '&' at byte 11"
        );
        assert_eq!(
            error("Host(`a`) Path(`/`)"),
            "invalid rule \"Host(`a`) Path(`/`)\": expected '&&', '||' or the end of the rule, \
             found 'P' at byte 11"
        );
    }

    #[test]
    fn unterminated_string_reported() {
        assert_eq!(
            error("Host(`a)"),
            "invalid rule \"Host(`a)\": unterminated backtick string at byte 6"
        );
    }

    #[test]
    fn single_quotes_rejected_with_fix() {
        assert_eq!(
            error("Host('example.com') && PathPrefix('/api')"),
            "invalid rule \"Host('example.com') && PathPrefix('/api')\": single quotes are not \
             accepted at byte 6; write Host(`example.com`) && PathPrefix(`/api`)"
        );
    }

    #[test]
    fn wrapped_rule_rejected_bc02() {
        assert_eq!(
            error("'PathPrefix(`/`)'"),
            "invalid rule \"'PathPrefix(`/`)'\": the whole rule is wrapped in quotes at byte 1; \
             remove them: PathPrefix(`/`)"
        );
        assert!(error("\"Host(`a`)\"").contains("remove them: Host(`a`)"));
    }

    #[test]
    fn empty_call_argument_rejected_bc02() {
        // Shell quoting can strip the backticks, leaving PathPrefix().
        assert_eq!(
            error("PathPrefix()"),
            "invalid rule \"PathPrefix()\": PathPrefix takes at least 1 argument, found 0 at \
             byte 1"
        );
    }

    #[test]
    fn bare_argument_needs_quotes() {
        assert_eq!(
            error("Host(example.com) && PathPrefix(/api)"),
            "invalid rule \"Host(example.com) && PathPrefix(/api)\": argument /api of \
             PathPrefix is not quoted at byte 33; write Host(`example.com`) && \
             PathPrefix(`/api`)"
        );
    }

    #[test]
    fn non_ascii_host_suggests_punycode_bc07() {
        assert_eq!(
            error("Host(`bücher.example`)"),
            "invalid rule \"Host(`bücher.example`)\": host `bücher.example` contains non-ASCII \
             characters at byte 6; write the name in punycode (xn--...)"
        );
        assert!(rule("Host(`xn--bcher-kva.example`)").matches(&host("xn--bcher-kva.example")));
    }

    #[test]
    fn wildcard_cases_bc07() {
        let expr = rule("Host(`*.example.com`)");
        // The data plane lowercases the request host, so A.EXAMPLE.com arrives lowercased.
        assert!(expr.matches(&host("a.example.com")));
        assert!(expr.matches(&host(&"A.EXAMPLE.com".to_ascii_lowercase())));
        assert!(!expr.matches(&host("example.com")));
        assert!(!expr.matches(&host("a.b.example.com")));
    }

    #[test]
    fn host_case_port_ipv6_bc06() {
        // The data plane strips ports and brackets and lowercases before matching.
        assert!(rule("Host(`shop.example.com`)").matches(&host("shop.example.com")));
        assert!(rule(r"HostRegexp(`^shop\.example\.com$`)").matches(&host("shop.example.com")));
        assert!(rule("Host(`2001:db8::1`)").matches(&host("2001:db8::1")));
        assert!(!rule("Host(`a.test`)").matches(&host("")));
    }

    #[test]
    fn trailing_dot_rule_bc09() {
        let expr = rule("Host(`app.example.com.`)");
        assert!(expr.matches(&host("app.example.com")));
        assert_eq!(expr.hosts(), vec!["app.example.com".to_owned()]);
    }

    #[test]
    fn regex_error_names_pattern() {
        assert_eq!(
            error("PathRegexp(`/a(`)"),
            "invalid rule \"PathRegexp(`/a(`)\": invalid regular expression `/a(`: unclosed \
             group at byte 12"
        );
    }

    #[test]
    fn huge_regex_rejected() {
        let message = error("PathRegexp(`(\\w{100}){100}`)");
        assert!(message.contains("larger than the limit"), "{message}");
    }

    #[test]
    fn empty_rule_rejected() {
        assert_eq!(error("  "), "invalid rule \"  \": rule is empty");
    }

    #[test]
    fn long_rule_rejected() {
        let text = format!("Path(`/{}`)", "a".repeat(MAX_RULE_BYTES));
        let message = error(&text);
        assert!(
            message.ends_with("rule is 65545 bytes long, above the maximum of 65536 bytes"),
            "{message}"
        );
        assert!(message.contains("aaa...\""), "{message}");
    }

    #[test]
    fn deep_nesting_rejected() {
        let text = format!("{}Host(`a`){}", "(".repeat(1000), ")".repeat(1000));
        assert!(error(&text).contains("nested more than 64 levels deep at byte 65"));
        let negations = format!("{}Host(`a`)", "!".repeat(1000));
        assert!(error(&negations).contains("nested more than 64 levels deep"));
        let allowed = format!("{}Host(`a`){}", "(".repeat(64), ")".repeat(64));
        assert!(parse(&allowed).is_ok());
    }

    #[test]
    fn long_chain_is_balanced() {
        let text = vec!["Host(`a`)"; 5000].join(" || ") + " || Host(`b`)";
        let expr = rule(&text);
        assert!(expr.matches(&host("b")));
        assert!(depth(&expr) <= 14, "depth {}", depth(&expr));
    }

    fn depth(expr: &Expr) -> usize {
        match expr {
            Expr::And(left, right) | Expr::Or(left, right) => 1 + depth(left).max(depth(right)),
            Expr::Not(operand) => 1 + depth(operand),
            Expr::Matcher(_) => 1,
        }
    }

    #[test]
    fn host_constraint_of_combinations() {
        let exact = |name: &str| HostPattern::Exact(name.to_owned());
        assert_eq!(
            rule("Host(`a`, `b`)").host_constraint(),
            Some(vec![exact("a"), exact("b")])
        );
        assert_eq!(
            rule("PathPrefix(`/`) && Host(`a`) && Host(`b`)").host_constraint(),
            Some(vec![exact("a")])
        );
        assert_eq!(
            rule("Host(`a`) || Host(`*.b`) || Host(`a`)").host_constraint(),
            Some(vec![exact("a"), HostPattern::Wildcard("b".to_owned())])
        );
        assert_eq!(rule("Host(`a`) || Path(`/`)").host_constraint(), None);
        assert_eq!(rule("!Host(`a`)").host_constraint(), None);
        assert_eq!(
            rule("Host(`*`)").host_constraint(),
            Some(vec![HostPattern::Any])
        );
    }

    #[test]
    fn hosts_lists_names_once() {
        let expr = rule("(Host(`B.test`) || Host(`*.c.test`, `*`)) && !Host(`b.test`, `d.test.`)");
        assert_eq!(expr.hosts(), vec!["b.test", "*.c.test", "d.test"]);
    }

    #[test]
    fn error_accessors_report_parts() {
        let Err(error) = parse("Host(`a`") else {
            panic!("rule parsed")
        };
        assert_eq!(error.rule(), "Host(`a`");
        assert_eq!(error.position(), Some(9));
        assert_eq!(
            error.kind(),
            &RuleErrorKind::Unexpected {
                expected: "')'",
                found: None
            }
        );
        assert_eq!(error.hint(), None);
    }

    #[test]
    fn control_characters_escaped_in_message() {
        assert_eq!(
            error("Host(`a`)\n&"),
            "invalid rule \"Host(`a`)\\n&\": expected '&&', found '&' at byte 11"
        );
    }

    /// A linear congruential generator, enough to vary inputs from a fixed seed.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, bound: usize) -> usize {
            usize::try_from(self.next()).unwrap_or(0) % bound
        }
    }

    const VALID_RULES: &[&str] = &[
        "Host(`a.example.com`) && PathPrefix(`/api`) || !Method(`GET`, `POST`)",
        r#"(HostRegexp(`{sub:[a-z]+}.example.com`) || Path("/x\u00e9\x41")) && Query(`a=1`, `b`)"#,
        "HeaderRegexp(`X-A`, `^b{2}$`) && QueryRegexp(`id`, `[0-9]+`) && ClientIP(`::1`, `10.0.0.0/8`)",
        "Host(example.com,*.example.com) && Path(`/route/{id:[0-9]{2}}`) && Query(`a=`, `b=1`)",
    ];

    #[test]
    fn parse_survives_malformed_input() {
        // Every prefix of valid rules.
        for valid in VALID_RULES {
            for end in 0..=valid.len() {
                let bytes = &valid.as_bytes()[..end];
                let _ = parse(&String::from_utf8_lossy(bytes));
            }
        }

        let mut random = Lcg(0x5eed);
        // Random bytes.
        for _ in 0..2000 {
            let length = random.below(40);
            let bytes: Vec<u8> = (0..length).map(|_| (random.next() & 0xff) as u8).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }

        // Random sequences of rule fragments, which reach deeper into the grammar.
        const FRAGMENTS: &[&str] = &[
            "Host",
            "HostRegexp",
            "Path",
            "PathPrefix",
            "Query",
            "Header",
            "ClientIP",
            "Method",
            "(",
            ")",
            ",",
            "!",
            "&&",
            "||",
            "&",
            "|",
            "`a`",
            "`/`",
            "`",
            "\"",
            "\"\\x4",
            "\\u",
            "'",
            "{",
            "}",
            "{id:",
            "[",
            "*",
            ".",
            " ",
            "é",
            "=",
            "`{x}`",
            "`::1`",
            "`10.0.0.0/8`",
        ];
        let request = FakeRequest::new("a", "/").query("a=1&b").header("X", b"y");
        for _ in 0..5000 {
            let count = random.below(16);
            let text: String = (0..count)
                .map(|_| FRAGMENTS[random.below(FRAGMENTS.len())])
                .collect();
            if let Ok(expr) = parse(&text) {
                let _ = expr.matches(&request);
                let _ = expr.host_constraint();
                let _ = expr.hosts();
            }
        }
    }
}
