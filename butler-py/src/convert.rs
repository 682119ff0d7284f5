//! JSON values to and from Python objects: dicts keep their key order both ways.

use std::path::PathBuf;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

use crate::errors::invalid;

/// Deeper than this, a value is taken to contain itself.
const MAX_DEPTH: usize = 256;

/// Why a Python value is not JSON, and where in it.
struct NotJson {
    /// Keys and indexes from the outermost value inwards, filled in while unwinding.
    path: Vec<String>,
    message: String,
}

impl NotJson {
    fn new(message: String) -> Self {
        NotJson {
            path: Vec::new(),
            message,
        }
    }

    fn at(mut self, step: String) -> Self {
        self.path.push(step);
        self
    }
}

/// The JSON value of `obj`: `dict` (with `str` keys), `list`, `tuple`, `str`, `int`, `float`,
/// `bool` and `None`. Anything else raises [`InvalidInputError`](crate::errors::InvalidInputError)
/// naming `what` and the place of the bad value.
pub fn to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    value(obj, 0).map_err(|err| {
        let place = if err.path.is_empty() {
            String::new()
        } else {
            let mut steps = err.path;
            steps.reverse();
            format!(" at {}", steps.concat())
        };
        invalid(format!("{what}{place}: {}", err.message))
    })
}

fn value(obj: &Bound<'_, PyAny>, depth: usize) -> Result<Value, NotJson> {
    if depth > MAX_DEPTH {
        return Err(NotJson::new(format!(
            "nested more than {MAX_DEPTH} levels deep; a dict or list that contains itself \
             cannot be stored as JSON"
        )));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // `bool` is a subclass of `int`, so it is tested first.
    if let Ok(flag) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(flag.is_true()));
    }
    if let Ok(text) = obj.cast::<PyString>() {
        let text = text.to_cow().map_err(|err| NotJson::new(err.to_string()))?;
        return Ok(Value::String(text.into_owned()));
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(n) = obj.extract::<i64>() {
            return Ok(Value::from(n));
        }
        if let Ok(n) = obj.extract::<u64>() {
            return Ok(Value::from(n));
        }
        return Err(NotJson::new(format!(
            "the integer {obj} does not fit in 64 bits; store it as a string"
        )));
    }
    if let Ok(float) = obj.cast::<PyFloat>() {
        let x = float.value();
        return Number::from_f64(x).map(Value::Number).ok_or_else(|| {
            NotJson::new(format!(
                "{} is not a JSON number; store it as a string or as null",
                repr(obj)
            ))
        });
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut map = Map::with_capacity(dict.len());
        for (key, item) in dict.iter() {
            let Ok(key) = key.cast::<PyString>() else {
                return Err(NotJson::new(format!(
                    "the key {} is {}, but JSON keys are strings; convert it with str()",
                    repr(&key),
                    type_name(&key)
                )));
            };
            let key = key.to_cow().map_err(|err| NotJson::new(err.to_string()))?;
            let item =
                value(&item, depth + 1).map_err(|err| err.at(format!("[{}]", repr_str(&key))))?;
            map.insert(key.into_owned(), item);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(list) = obj.cast::<PyList>() {
        let mut items = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            items.push(value(&item, depth + 1).map_err(|err| err.at(format!("[{i}]")))?);
        }
        return Ok(Value::Array(items));
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        let mut items = Vec::with_capacity(tuple.len());
        for (i, item) in tuple.iter().enumerate() {
            items.push(value(&item, depth + 1).map_err(|err| err.at(format!("[{i}]")))?);
        }
        return Ok(Value::Array(items));
    }
    Err(NotJson::new(format!(
        "{} is {}, which JSON cannot hold; use dict, list, str, int, float, bool or None",
        repr(obj),
        type_name(obj)
    )))
}

/// The Python object of a JSON value: `dict` (in the document's key order), `list`, `str`,
/// `int`, `float`, `bool` or `None`.
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
        Value::Number(number) => {
            if let Some(n) = number.as_i64() {
                n.into_pyobject(py)?.into_any()
            } else if let Some(n) = number.as_u64() {
                n.into_pyobject(py)?.into_any()
            } else {
                number
                    .as_f64()
                    .unwrap_or(f64::NAN)
                    .into_pyobject(py)?
                    .into_any()
            }
        }
        Value::String(text) => PyString::new(py, text).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// A config argument: a dict, or the path (`str` or `os.PathLike`) of a JSON file.
pub enum ConfigArg {
    /// Given inline.
    Value(Value),
    /// To be read from this file.
    File(PathBuf),
}

impl ConfigArg {
    /// Reads `obj` as a config argument; `what` names it in errors.
    pub fn extract(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<ConfigArg> {
        if let Some(path) = as_path(obj)? {
            return Ok(ConfigArg::File(path));
        }
        if obj.cast::<PyDict>().is_ok() {
            return Ok(ConfigArg::Value(to_json(obj, what)?));
        }
        Err(PyTypeError::new_err(format!(
            "{what} must be a dict or the path of a JSON file, not {}",
            type_name(obj)
        )))
    }

    /// The config's JSON value, read from its file if it has one (call without the GIL).
    pub fn load(self) -> butler_core::Result<Value> {
        match self {
            ConfigArg::Value(value) => Ok(value),
            ConfigArg::File(path) => butler_core::config::read_json_file(&path),
        }
    }
}

/// `obj` as a filesystem path if it is a `str` or an `os.PathLike`.
pub fn as_path(obj: &Bound<'_, PyAny>) -> PyResult<Option<PathBuf>> {
    if obj.cast::<PyString>().is_ok() || obj.hasattr("__fspath__")? {
        return obj.extract::<PathBuf>().map(Some);
    }
    Ok(None)
}

/// `repr(obj)`, shortened for messages.
pub fn repr(obj: &Bound<'_, PyAny>) -> String {
    let text = obj
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unprintable>".to_owned());
    if text.chars().count() > 60 {
        let short: String = text.chars().take(57).collect();
        format!("{short}...")
    } else {
        text
    }
}

/// The type of `obj` with an article, as messages name it ("a set").
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    let name = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_owned());
    let article = match name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u' | 'A' | 'E' | 'I' | 'O' | 'U') => "an",
        _ => "a",
    };
    format!("{article} {name}")
}

/// `repr()` of a Python `str` holding `text`, as Python writes it.
pub fn repr_str(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => match u32::from(c) {
                code @ 0..=0xff => out.push_str(&format!("\\x{code:02x}")),
                code @ 0x100..=0xffff => out.push_str(&format!("\\u{code:04x}")),
                code => out.push_str(&format!("\\U{code:08x}")),
            },
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `repr()` of an optional `str`: the string's, or `None`.
pub fn repr_opt(text: Option<&str>) -> String {
    text.map_or_else(|| "None".to_owned(), repr_str)
}
