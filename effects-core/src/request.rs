//! Requests: outgoing HTTP calls to named endpoints.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A user type that becomes an outgoing HTTP request.
///
/// Implement it with `#[derive(Request)]`. The endpoint is a name resolved from the executor's
/// configuration, never a hard-coded URL; `{field}` placeholders in the path are filled from the
/// type's fields. The body is the type's `Serialize` form (none for `GET`, `HEAD` and `DELETE`).
///
/// ```
/// use effects_core::{Method, Request};
/// use serde::Serialize;
///
/// #[derive(Request, Serialize)]
/// #[request(method = "POST", endpoint = "notifications", path = "/customers/{customer_id}/notify")]
/// pub struct Notify {
///     pub customer_id: String,
///     pub text: String,
/// }
///
/// let req = Notify { customer_id: "u1".into(), text: "hi".into() }.to_request();
/// assert_eq!(req.method, Method::Post);
/// assert_eq!(req.path, "/customers/u1/notify");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a request",
    label = "not a request",
    note = "derive it: `#[derive(effects_core::Request, serde::Serialize)] #[request(method = \"POST\", endpoint = \"...\", path = \"/...\")]`"
)]
pub trait Request {
    /// The HTTP method.
    const METHOD: Method;
    /// The endpoint's name in the executor's configuration.
    const ENDPOINT: &'static str;
    /// The path template, with `{field}` placeholders.
    const PATH: &'static str;

    /// The erased request.
    fn to_request(&self) -> RequestEffect;

    crate::__private::slot_items!(
        requests,
        crate::Matcher::Request {
            method: Self::METHOD,
            endpoint: Self::ENDPOINT,
            path: Self::PATH
        },
        |item| item.to_request(),
        |item| item.to_request()
    );
}

/// An HTTP method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
}

impl Method {
    /// Every method, in declaration order.
    pub const ALL: [Method; 6] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
    ];

    /// The method's name in upper case, as on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// Whether a request with this method carries a body.
    pub const fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An erased outgoing request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEffect {
    /// The method.
    pub method: Method,
    /// The endpoint's name in the executor's configuration.
    pub endpoint: String,
    /// The path, appended to the endpoint's base URL.
    pub path: String,
    /// Extra headers; the executor adds `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The JSON body; `Some(Value::Null)` sends the body `null`, `None` sends no body.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub body: Option<Value>,
}

impl RequestEffect {
    /// A request with no headers and no body.
    pub fn new(method: Method, endpoint: impl Into<String>, path: impl Into<String>) -> Self {
        RequestEffect {
            method,
            endpoint: endpoint.into(),
            path: path.into(),
            headers: BTreeMap::new(),
            body: None,
        }
    }

    /// Sets the JSON body.
    #[must_use]
    pub fn with_body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
}

/// A field that is present is `Some`, even when it is `null`; an absent one is `None` (by
/// `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Whether `path` fits `template`, where a `{name}` segment of the template matches any one
/// non-empty segment.
pub(crate) fn path_matches(template: &str, path: &str) -> bool {
    let (t, p) = (template.split('/'), path.split('/'));
    t.clone().count() == p.clone().count()
        && t.zip(p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

#[cfg(test)]
mod tests {
    use super::path_matches;

    #[test]
    fn templates_match_one_segment_per_placeholder() {
        assert!(path_matches("/a/{id}/b", "/a/42/b"));
        assert!(!path_matches("/a/{id}/b", "/a//b"));
        assert!(!path_matches("/a/{id}/b", "/a/4/2/b"));
        assert!(!path_matches("/a/{id}", "/b/1"));
        assert!(path_matches("/plain", "/plain"));
    }
}
