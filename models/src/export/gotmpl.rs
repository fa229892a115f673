//! A subset of Go's `text/template`, enough to run Ollama chat templates: text, `{{ pipeline }}`
//! with `{{-` / `-}}` trimming, comments, `if` / `else if` / `else`, `range` (with `$i, $x :=`),
//! `with`, variables (`$x := ...`, `$x = ...`, `$`), fields (`.Role`, `$.Messages`,
//! `(index .Messages 0).Role`), string / number / bool literals, pipes, and the functions
//! `eq ne lt le gt ge and or not len index slice print json`.
//!
//! [`render_ollama`] executes a template the way Ollama's `template.Execute` does: with
//! `.Messages` (consecutive messages of one role merged, `.System` the joined system messages)
//! when the template uses them, else the legacy `.System` / `.Prompt` / `.Response` form.

use std::collections::BTreeMap;

use crate::chat_template::Message;
use crate::{Error, Result};

/// A template value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Nil,
    Bool(bool),
    Int(i64),
    Str(String),
    List(Vec<Val>),
    Map(BTreeMap<String, Val>),
}

impl Val {
    fn truthy(&self) -> bool {
        match self {
            Val::Nil => false,
            Val::Bool(b) => *b,
            Val::Int(i) => *i != 0,
            Val::Str(s) => !s.is_empty(),
            Val::List(l) => !l.is_empty(),
            Val::Map(m) => !m.is_empty(),
        }
    }

    fn print(&self, out: &mut String) {
        match self {
            Val::Nil => out.push_str("<no value>"),
            Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Val::Int(i) => out.push_str(&i.to_string()),
            Val::Str(s) => out.push_str(s),
            Val::List(l) => {
                out.push('[');
                for (i, v) in l.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    v.print(out);
                }
                out.push(']');
            }
            Val::Map(m) => {
                out.push_str("map[");
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(k);
                    out.push(':');
                    v.print(out);
                }
                out.push(']');
            }
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Val::Nil => serde_json::Value::Null,
            Val::Bool(b) => serde_json::json!(b),
            Val::Int(i) => serde_json::json!(i),
            Val::Str(s) => serde_json::json!(s),
            Val::List(l) => serde_json::Value::Array(l.iter().map(Val::to_json).collect()),
            Val::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `.A.B` (empty = the dot itself).
    Field(Vec<String>),
    /// `$name` with trailing fields.
    Var(String, Vec<String>),
    Str(String),
    Int(i64),
    LParen,
    /// `)` followed by fields: `(...).A.B`.
    RParen(Vec<String>),
    Pipe,
    Declare,
    Assign,
    Comma,
}

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Field(Vec<String>),
    Var(String, Vec<String>),
    Lit(Val),
    Func(String),
    Sub(Box<Pipeline>, Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
struct Pipeline {
    vars: Vec<String>,
    /// `=` (assign an existing variable) rather than `:=`.
    assign: bool,
    cmds: Vec<Vec<Arg>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Action(Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Range(Pipeline, Vec<Node>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    nodes: Vec<Node>,
    /// Every field name used (lower case), as Ollama's `Vars`.
    fields: Vec<String>,
}

fn err(msg: impl std::fmt::Display) -> Error {
    Error::ChatTemplate(format!("Go template: {msg}"))
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Splits the source into text and action pieces, applying the trim markers.
fn split(src: &str) -> Result<Vec<(bool, String)>> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while !rest.is_empty() {
        let Some(open) = rest.find("{{") else {
            let mut t = rest.to_string();
            if trim_next {
                t = t.trim_start_matches(is_space).to_string();
            }
            out.push((false, t));
            break;
        };
        let mut text = rest[..open].to_string();
        if trim_next {
            text = text.trim_start_matches(is_space).to_string();
        }
        let mut body = &rest[open + 2..];
        if body.starts_with("- ") || body.starts_with("-\n") || body.starts_with("-\t") {
            text = text.trim_end_matches(is_space).to_string();
            body = &body[1..];
        }
        out.push((false, text));
        // Find the closing braces outside string literals.
        let bytes = body.as_bytes();
        let mut i = 0;
        let mut close = None;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        if bytes[i] == b'\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                }
                b'`' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'`' {
                        i += 1;
                    }
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        let close = close.ok_or_else(|| err("an action is not closed with }}"))?;
        let mut action = &body[..close];
        trim_next = false;
        if action.ends_with(" -") || action.ends_with("\n-") || action.ends_with("\t-") {
            action = &action[..action.len() - 1];
            trim_next = true;
        }
        out.push((true, action.trim().to_string()));
        rest = &body[close + 2..];
    }
    Ok(out)
}

fn lex(action: &str) -> Result<Vec<Tok>> {
    let cs: Vec<char> = action.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let fields = |cs: &[char], i: &mut usize| -> Vec<String> {
        let mut f = Vec::new();
        while *i < cs.len() && cs[*i] == '.' {
            *i += 1;
            let start = *i;
            while *i < cs.len() && (cs[*i].is_alphanumeric() || cs[*i] == '_') {
                *i += 1;
            }
            if *i > start {
                f.push(cs[start..*i].iter().collect());
            }
        }
        f
    };
    while i < cs.len() {
        let c = cs[i];
        if is_space(c) {
            i += 1;
        } else if c == '.' {
            out.push(Tok::Field(fields(&cs, &mut i)));
        } else if c == '$' {
            i += 1;
            let start = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            let name: String = cs[start..i].iter().collect();
            out.push(Tok::Var(name, fields(&cs, &mut i)));
        } else if c == '"' {
            i += 1;
            let mut s = String::new();
            while i < cs.len() && cs[i] != '"' {
                if cs[i] == '\\' && i + 1 < cs.len() {
                    i += 1;
                    s.push(match cs[i] {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                } else {
                    s.push(cs[i]);
                }
                i += 1;
            }
            if i >= cs.len() {
                return Err(err("unterminated string"));
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c == '`' {
            i += 1;
            let start = i;
            while i < cs.len() && cs[i] != '`' {
                i += 1;
            }
            if i >= cs.len() {
                return Err(err("unterminated raw string"));
            }
            out.push(Tok::Str(cs[start..i].iter().collect()));
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '-' && cs.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            i += 1;
            while i < cs.len() && cs[i].is_ascii_digit() {
                i += 1;
            }
            let s: String = cs[start..i].iter().collect();
            out.push(Tok::Int(
                s.parse().map_err(|_| err(format!("bad number {s}")))?,
            ));
        } else if c == '(' {
            out.push(Tok::LParen);
            i += 1;
        } else if c == ')' {
            i += 1;
            out.push(Tok::RParen(fields(&cs, &mut i)));
        } else if c == '|' {
            out.push(Tok::Pipe);
            i += 1;
        } else if c == ',' {
            out.push(Tok::Comma);
            i += 1;
        } else if c == ':' && cs.get(i + 1) == Some(&'=') {
            out.push(Tok::Declare);
            i += 2;
        } else if c == '=' {
            out.push(Tok::Assign);
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(cs[start..i].iter().collect()));
        } else {
            return Err(err(format!("unexpected '{c}' in an action")));
        }
    }
    Ok(out)
}

struct PipeParser<'a> {
    toks: &'a [Tok],
    pos: usize,
    fields: &'a mut Vec<String>,
}

impl PipeParser<'_> {
    fn pipeline(&mut self, allow_decl: bool) -> Result<Pipeline> {
        let mut vars = Vec::new();
        let mut assign = false;
        if allow_decl {
            // `$a, $b :=` / `$a :=` / `$a =`
            let mut j = self.pos;
            let mut names = Vec::new();
            while let Some(Tok::Var(n, f)) = self.toks.get(j) {
                if !f.is_empty() {
                    break;
                }
                names.push(n.clone());
                j += 1;
                if self.toks.get(j) == Some(&Tok::Comma) {
                    j += 1;
                } else {
                    break;
                }
            }
            match self.toks.get(j) {
                Some(Tok::Declare) if !names.is_empty() => {
                    vars = names;
                    self.pos = j + 1;
                }
                Some(Tok::Assign) if names.len() == 1 => {
                    vars = names;
                    assign = true;
                    self.pos = j + 1;
                }
                _ => {}
            }
        }
        let mut cmds = Vec::new();
        loop {
            let mut args = Vec::new();
            while let Some(t) = self.toks.get(self.pos) {
                match t {
                    Tok::Pipe | Tok::RParen(_) => break,
                    _ => args.push(self.arg()?),
                }
            }
            if args.is_empty() {
                return Err(err("missing value in a pipeline"));
            }
            cmds.push(args);
            if self.toks.get(self.pos) == Some(&Tok::Pipe) {
                self.pos += 1;
            } else {
                break;
            }
        }
        Ok(Pipeline { vars, assign, cmds })
    }

    fn arg(&mut self) -> Result<Arg> {
        let t = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or_else(|| err("unexpected end"))?;
        self.pos += 1;
        Ok(match t {
            Tok::Field(f) => {
                for x in &f {
                    self.fields.push(x.to_ascii_lowercase());
                }
                Arg::Field(f)
            }
            Tok::Var(n, f) => Arg::Var(n, f),
            Tok::Str(s) => Arg::Lit(Val::Str(s)),
            Tok::Int(i) => Arg::Lit(Val::Int(i)),
            Tok::Ident(id) => match id.as_str() {
                "true" => Arg::Lit(Val::Bool(true)),
                "false" => Arg::Lit(Val::Bool(false)),
                "nil" => Arg::Lit(Val::Nil),
                _ => Arg::Func(id),
            },
            Tok::LParen => {
                let p = self.pipeline(false)?;
                match self.toks.get(self.pos).cloned() {
                    Some(Tok::RParen(f)) => {
                        self.pos += 1;
                        Arg::Sub(Box::new(p), f)
                    }
                    _ => return Err(err("unclosed parenthesis")),
                }
            }
            other => return Err(err(format!("unexpected {other:?}"))),
        })
    }
}

enum Frame {
    If {
        branches: Vec<(Pipeline, Vec<Node>)>,
        else_: Option<Vec<Node>>,
    },
    Range {
        pipe: Pipeline,
        body: Vec<Node>,
        else_: Option<Vec<Node>>,
    },
    With {
        pipe: Pipeline,
        body: Vec<Node>,
        else_: Option<Vec<Node>>,
    },
}

impl Template {
    /// Parses `src`; errors name what is wrong.
    pub fn parse(src: &str) -> Result<Template> {
        let mut fields = Vec::new();
        // A stack of open blocks; nodes go to the innermost one.
        let mut root: Vec<Node> = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        fn push(stack: &mut [Frame], root: &mut Vec<Node>, n: Node) {
            match stack.last_mut() {
                None => root.push(n),
                Some(Frame::If { branches, else_ }) => match else_ {
                    Some(e) => e.push(n),
                    None => {
                        if let Some(b) = branches.last_mut() {
                            b.1.push(n)
                        }
                    }
                },
                Some(Frame::Range { body, else_, .. }) | Some(Frame::With { body, else_, .. }) => {
                    match else_ {
                        Some(e) => e.push(n),
                        None => body.push(n),
                    }
                }
            }
        }
        for (is_action, piece) in split(src)? {
            if !is_action {
                if !piece.is_empty() {
                    push(&mut stack, &mut root, Node::Text(piece));
                }
                continue;
            }
            if piece.starts_with("/*") {
                if !piece.ends_with("*/") {
                    return Err(err("unclosed comment"));
                }
                continue;
            }
            let toks = lex(&piece)?;
            let mut p = PipeParser {
                toks: &toks,
                pos: 0,
                fields: &mut fields,
            };
            let head = match toks.first() {
                Some(Tok::Ident(s)) => s.clone(),
                _ => String::new(),
            };
            match head.as_str() {
                "if" | "range" | "with" => {
                    p.pos = 1;
                    let pipe = p.pipeline(head != "if")?;
                    if p.pos != toks.len() {
                        return Err(err(format!("extra tokens in {{{{ {piece} }}}}")));
                    }
                    stack.push(match head.as_str() {
                        "if" => Frame::If {
                            branches: vec![(pipe, Vec::new())],
                            else_: None,
                        },
                        "range" => Frame::Range {
                            pipe,
                            body: Vec::new(),
                            else_: None,
                        },
                        _ => Frame::With {
                            pipe,
                            body: Vec::new(),
                            else_: None,
                        },
                    });
                }
                "else" => {
                    let frame = stack
                        .last_mut()
                        .ok_or_else(|| err("{{ else }} outside a block"))?;
                    if matches!(toks.get(1), Some(Tok::Ident(s)) if s == "if") {
                        p.pos = 2;
                        let pipe = p.pipeline(false)?;
                        match frame {
                            Frame::If {
                                branches,
                                else_: None,
                            } => branches.push((pipe, Vec::new())),
                            _ => return Err(err("{{ else if }} outside an if")),
                        }
                    } else if toks.len() == 1 {
                        match frame {
                            Frame::If { else_, .. }
                            | Frame::Range { else_, .. }
                            | Frame::With { else_, .. } => {
                                if else_.is_some() {
                                    return Err(err("two {{ else }} in one block"));
                                }
                                *else_ = Some(Vec::new());
                            }
                        }
                    } else {
                        return Err(err(format!("unsupported {{{{ {piece} }}}}")));
                    }
                }
                "end" => {
                    let frame = stack
                        .pop()
                        .ok_or_else(|| err("{{ end }} without a block"))?;
                    let node = match frame {
                        Frame::If { branches, else_ } => {
                            Node::If(branches, else_.unwrap_or_default())
                        }
                        Frame::Range { pipe, body, else_ } => {
                            Node::Range(pipe, body, else_.unwrap_or_default())
                        }
                        Frame::With { pipe, body, else_ } => {
                            Node::With(pipe, body, else_.unwrap_or_default())
                        }
                    };
                    push(&mut stack, &mut root, node);
                }
                "define" | "template" | "block" | "break" | "continue" => {
                    return Err(err(format!("{{{{ {head} }}}} is not supported")));
                }
                _ => {
                    let pipe = p.pipeline(true)?;
                    if p.pos != toks.len() {
                        return Err(err(format!("extra tokens in {{{{ {piece} }}}}")));
                    }
                    push(&mut stack, &mut root, Node::Action(pipe));
                }
            }
        }
        if !stack.is_empty() {
            return Err(err("a block is not closed with {{ end }}"));
        }
        fields.sort();
        fields.dedup();
        Ok(Template {
            nodes: root,
            fields,
        })
    }

    /// Field names used, lower case (Ollama's `Vars`).
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Executes with `data` as the dot (and `$`).
    pub fn execute(&self, data: &Val) -> Result<String> {
        let mut ex = Exec {
            root: data.clone(),
            vars: vec![("".into(), data.clone())],
            out: String::new(),
            steps: 0,
        };
        ex.nodes(&self.nodes, data)?;
        Ok(ex.out)
    }
}

struct Exec {
    root: Val,
    vars: Vec<(String, Val)>,
    out: String,
    steps: usize,
}

fn field_of(v: &Val, names: &[String]) -> Result<Val> {
    let mut cur = v.clone();
    for n in names {
        cur = match cur {
            Val::Map(m) => m.get(n).cloned().unwrap_or(Val::Nil),
            Val::Nil => return Err(err(format!("nil pointer evaluating .{n}"))),
            other => return Err(err(format!("can't evaluate field {n} in {other:?}"))),
        };
    }
    Ok(cur)
}

fn as_int(v: &Val) -> Result<i64> {
    match v {
        Val::Int(i) => Ok(*i),
        other => Err(err(format!("expected an integer, got {other:?}"))),
    }
}

fn basic_eq(a: &Val, b: &Val) -> Result<bool> {
    match (a, b) {
        (Val::Str(x), Val::Str(y)) => Ok(x == y),
        (Val::Int(x), Val::Int(y)) => Ok(x == y),
        (Val::Bool(x), Val::Bool(y)) => Ok(x == y),
        (Val::Nil, Val::Nil) => Ok(true),
        _ => Err(err(format!(
            "incompatible types for comparison: {a:?} and {b:?}"
        ))),
    }
}

impl Exec {
    fn var(&self, name: &str) -> Result<Val> {
        if name.is_empty() {
            return Ok(self.root.clone());
        }
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| err(format!("undefined variable ${name}")))
    }

    fn nodes(&mut self, nodes: &[Node], dot: &Val) -> Result<()> {
        for n in nodes {
            self.steps += 1;
            if self.steps > 1_000_000 {
                return Err(err("the template runs too long"));
            }
            match n {
                Node::Text(t) => self.out.push_str(t),
                Node::Action(p) => {
                    let v = self.pipeline(p, dot)?;
                    if p.vars.is_empty() {
                        v.print(&mut self.out);
                    }
                }
                Node::If(branches, else_) => {
                    let mark = self.vars.len();
                    let mut done = false;
                    for (p, body) in branches {
                        if self.pipeline(p, dot)?.truthy() {
                            self.nodes(body, dot)?;
                            done = true;
                            break;
                        }
                    }
                    if !done {
                        self.nodes(else_, dot)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::With(p, body, else_) => {
                    let mark = self.vars.len();
                    let v = self.pipeline_value(p, dot)?;
                    if v.truthy() {
                        if let Some(name) = p.vars.first() {
                            self.vars.push((name.clone(), v.clone()));
                        }
                        self.nodes(body, &v)?;
                    } else {
                        self.nodes(else_, dot)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::Range(p, body, else_) => {
                    let mark = self.vars.len();
                    let v = self.pipeline_value(p, dot)?;
                    let items: Vec<(Val, Val)> = match v {
                        Val::List(l) => l
                            .into_iter()
                            .enumerate()
                            .map(|(i, x)| (Val::Int(i as i64), x))
                            .collect(),
                        Val::Map(m) => m.into_iter().map(|(k, x)| (Val::Str(k), x)).collect(),
                        Val::Int(n) => (0..n).map(|i| (Val::Int(i), Val::Int(i))).collect(),
                        Val::Nil => Vec::new(),
                        other => return Err(err(format!("range can't iterate over {other:?}"))),
                    };
                    if items.is_empty() {
                        self.nodes(else_, dot)?;
                    }
                    for (k, x) in items {
                        let inner = self.vars.len();
                        match p.vars.as_slice() {
                            [] => {}
                            [one] => self.vars.push((one.clone(), x.clone())),
                            [a, b, ..] => {
                                self.vars.push((a.clone(), k));
                                self.vars.push((b.clone(), x.clone()));
                            }
                        }
                        self.nodes(body, &x)?;
                        self.vars.truncate(inner);
                    }
                    self.vars.truncate(mark);
                }
            }
        }
        Ok(())
    }

    /// The value of a pipeline that declares range/with variables (not assigned here).
    fn pipeline_value(&mut self, p: &Pipeline, dot: &Val) -> Result<Val> {
        let bare = Pipeline {
            vars: Vec::new(),
            assign: false,
            cmds: p.cmds.clone(),
        };
        self.pipeline(&bare, dot)
    }

    fn pipeline(&mut self, p: &Pipeline, dot: &Val) -> Result<Val> {
        let mut prev: Option<Val> = None;
        for cmd in &p.cmds {
            prev = Some(self.command(cmd, dot, prev)?);
        }
        let v = prev.unwrap_or(Val::Nil);
        if let Some(name) = p.vars.first() {
            if p.assign {
                let slot = self
                    .vars
                    .iter_mut()
                    .rev()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| err(format!("undefined variable ${name}")))?;
                slot.1 = v.clone();
            } else {
                self.vars.push((name.clone(), v.clone()));
            }
        }
        Ok(v)
    }

    fn arg(&mut self, a: &Arg, dot: &Val) -> Result<Val> {
        match a {
            Arg::Field(f) => field_of(dot, f),
            Arg::Var(n, f) => field_of(&self.var(n)?, f),
            Arg::Lit(v) => Ok(v.clone()),
            Arg::Func(name) => self.call(name, Vec::new(), None),
            Arg::Sub(p, f) => {
                let v = self.pipeline(p, dot)?;
                field_of(&v, f)
            }
        }
    }

    fn command(&mut self, args: &[Arg], dot: &Val, prev: Option<Val>) -> Result<Val> {
        match &args[0] {
            Arg::Func(name) => {
                let mut vals = Vec::new();
                for a in &args[1..] {
                    vals.push(self.arg(a, dot)?);
                }
                self.call(name, vals, prev)
            }
            first => {
                if args.len() > 1 || prev.is_some() {
                    return Err(err("can't give arguments to a non-function"));
                }
                self.arg(first, dot)
            }
        }
    }

    fn call(&mut self, name: &str, mut args: Vec<Val>, prev: Option<Val>) -> Result<Val> {
        if let Some(p) = prev {
            args.push(p);
        }
        let n = args.len();
        let need = |k: usize| -> Result<()> {
            if n < k {
                Err(err(format!("{name} needs {k} arguments, got {n}")))
            } else {
                Ok(())
            }
        };
        Ok(match name {
            "eq" => {
                need(2)?;
                let mut any = false;
                for b in &args[1..] {
                    any |= basic_eq(&args[0], b)?;
                }
                Val::Bool(any)
            }
            "ne" => {
                need(2)?;
                Val::Bool(!basic_eq(&args[0], &args[1])?)
            }
            "lt" | "le" | "gt" | "ge" => {
                need(2)?;
                let (a, b) = (as_int(&args[0])?, as_int(&args[1])?);
                Val::Bool(match name {
                    "lt" => a < b,
                    "le" => a <= b,
                    "gt" => a > b,
                    _ => a >= b,
                })
            }
            "and" => {
                need(1)?;
                let mut last = Val::Nil;
                for a in args {
                    if !a.truthy() {
                        return Ok(a);
                    }
                    last = a;
                }
                last
            }
            "or" => {
                need(1)?;
                let mut last = Val::Nil;
                for a in args {
                    if a.truthy() {
                        return Ok(a);
                    }
                    last = a;
                }
                last
            }
            "not" => {
                need(1)?;
                Val::Bool(!args[0].truthy())
            }
            "len" => {
                need(1)?;
                Val::Int(match &args[0] {
                    Val::Str(s) => s.len() as i64,
                    Val::List(l) => l.len() as i64,
                    Val::Map(m) => m.len() as i64,
                    other => return Err(err(format!("len of {other:?}"))),
                })
            }
            "index" => {
                need(1)?;
                let mut cur = args[0].clone();
                for k in &args[1..] {
                    cur = match (cur, k) {
                        (Val::List(l), Val::Int(i)) => l
                            .get(usize::try_from(*i).map_err(|_| err("negative index"))?)
                            .cloned()
                            .ok_or_else(|| err(format!("index out of range: {i}")))?,
                        (Val::Map(m), Val::Str(s)) => m.get(s).cloned().unwrap_or(Val::Nil),
                        (c, k) => return Err(err(format!("can't index {c:?} with {k:?}"))),
                    };
                }
                cur
            }
            "slice" => {
                need(1)?;
                let len = match &args[0] {
                    Val::List(l) => l.len(),
                    Val::Str(s) => s.len(),
                    other => return Err(err(format!("can't slice {other:?}"))),
                };
                let from = match args.get(1) {
                    Some(v) => as_int(v)? as usize,
                    None => 0,
                };
                let to = match args.get(2) {
                    Some(v) => as_int(v)? as usize,
                    None => len,
                };
                if from > to || to > len {
                    return Err(err(format!("slice [{from}:{to}] out of range of {len}")));
                }
                match &args[0] {
                    Val::List(l) => Val::List(l[from..to].to_vec()),
                    Val::Str(s) => Val::Str(s.get(from..to).unwrap_or_default().to_string()),
                    _ => Val::Nil,
                }
            }
            "print" => {
                let mut s = String::new();
                for a in &args {
                    a.print(&mut s);
                }
                Val::Str(s)
            }
            "json" => {
                need(1)?;
                Val::Str(args[0].to_json().to_string())
            }
            other => return Err(err(format!("function \"{other}\" not defined"))),
        })
    }
}

fn message_val(role: &str, content: &str) -> Val {
    let mut m = BTreeMap::new();
    m.insert("Role".into(), Val::Str(role.into()));
    m.insert("Content".into(), Val::Str(content.into()));
    m.insert("Thinking".into(), Val::Str(String::new()));
    m.insert("ToolCalls".into(), Val::List(Vec::new()));
    m.insert("ToolName".into(), Val::Str(String::new()));
    Val::Map(m)
}

/// Renders `messages` through an Ollama template as Ollama's `template.Execute` does (no
/// tools, thinking off).
pub fn render_ollama(t: &Template, messages: &[Message]) -> Result<String> {
    // collate: system messages joined; consecutive messages of one role merged.
    let mut system: Vec<&str> = Vec::new();
    let mut collated: Vec<(String, String)> = Vec::new();
    for m in messages {
        if m.role == "system" {
            system.push(&m.content);
        }
        match collated.last_mut() {
            Some(last) if last.0 == m.role => {
                last.1.push_str("\n\n");
                last.1.push_str(&m.content);
            }
            _ => collated.push((m.role.clone(), m.content.clone())),
        }
    }
    let base = |system: &str, prompt: Option<&str>, response: &str| -> Val {
        let mut d = BTreeMap::new();
        d.insert("System".into(), Val::Str(system.into()));
        if let Some(p) = prompt {
            d.insert("Prompt".into(), Val::Str(p.into()));
        }
        d.insert("Response".into(), Val::Str(response.into()));
        d.insert("Think".into(), Val::Bool(false));
        d.insert("ThinkLevel".into(), Val::Str(String::new()));
        d.insert("IsThinkSet".into(), Val::Bool(false));
        d.insert("Tools".into(), Val::Nil);
        Val::Map(d)
    };
    if t.fields().iter().any(|f| f == "messages") {
        let mut d = match base(&system.join("\n\n"), None, "") {
            Val::Map(d) => d,
            _ => BTreeMap::new(),
        };
        d.insert(
            "Messages".into(),
            Val::List(collated.iter().map(|(r, c)| message_val(r, c)).collect()),
        );
        return t.execute(&Val::Map(d));
    }
    // Legacy templates: one execution per exchange; the last one stops where .Response is.
    let mut out = String::new();
    let (mut sys, mut prompt, mut response) = (String::new(), String::new(), String::new());
    for (role, content) in &collated {
        let flush = |out: &mut String, s: &str, p: &str, r: &str| -> Result<()> {
            out.push_str(&t.execute(&base(s, Some(p), r))?);
            Ok(())
        };
        match role.as_str() {
            "system" => {
                if !prompt.is_empty() || !response.is_empty() {
                    flush(&mut out, &sys, &prompt, &response)?;
                    sys.clear();
                    prompt.clear();
                    response.clear();
                }
                sys = content.clone();
            }
            "user" => {
                if !response.is_empty() {
                    flush(&mut out, &sys, &prompt, &response)?;
                    sys.clear();
                    prompt.clear();
                    response.clear();
                }
                prompt = content.clone();
            }
            "assistant" => response = content.clone(),
            _ => {}
        }
    }
    const CUT: &str = "\u{E000}ATTUNE-RESPONSE\u{E000}";
    let last = t.execute(&base(&sys, Some(&prompt), &format!("{response}{CUT}")))?;
    match last.find(CUT) {
        Some(i) => out.push_str(&last[..i]),
        None => out.push_str(&last),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: &[(&str, &str)]) -> Vec<Message> {
        v.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    #[test]
    fn ollamas_chatml_template_renders_as_ollama_does() {
        // ollama/template/chatml.gotmpl and its testdata "system-user-assistant-user".
        let t = Template::parse(
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        )
        .expect("parse");
        let out = render_ollama(
            &t,
            &msgs(&[
                ("system", "You are a helpful assistant."),
                ("user", "Hello, how are you?"),
                ("assistant", "I'm doing great. How can I help you today?"),
                ("user", "I'd like to show off how chat templating works!"),
            ]),
        )
        .expect("render");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn variables_index_slice_and_else_if() {
        let t = Template::parse(
            "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n{{ if eq .Role \"user\" }}U:{{ .Content }}{{ else if eq .Role \"assistant\" }}A:{{ .Content }}{{ else }}S{{ end }}{{ if $last }}.{{ end }}{{ end }}{{ (index .Messages 0).Role }}",
        )
        .expect("parse");
        let out = render_ollama(
            &t,
            &msgs(&[("system", "x"), ("user", "hi"), ("assistant", "yo")]),
        )
        .expect("render");
        assert_eq!(out, "SU:hiA:yo.system");
    }

    #[test]
    fn legacy_template_stops_at_the_response() {
        let t = Template::parse(
            "{{ if .System }}<<{{ .System }}>>{{ end }}[INST] {{ .Prompt }} [/INST]{{ .Response }}</s>",
        )
        .expect("parse");
        let out = render_ollama(
            &t,
            &msgs(&[
                ("system", "S"),
                ("user", "Q1"),
                ("assistant", "A1"),
                ("user", "Q2"),
            ]),
        )
        .expect("render");
        assert_eq!(out, "<<S>>[INST] Q1 [/INST]A1</s>[INST] Q2 [/INST]");
    }

    #[test]
    fn errors_are_reported_not_panics() {
        for bad in [
            "{{ if .A }}x",
            "{{ end }}",
            "{{ .A",
            "{{ foo .A }}",
            "{{ \"x }}",
        ] {
            let r = Template::parse(bad).and_then(|t| t.execute(&Val::Map(BTreeMap::new())));
            assert!(r.is_err(), "{bad} should fail");
        }
    }
}
