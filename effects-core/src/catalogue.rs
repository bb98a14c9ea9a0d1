//! The handler catalogue (feature `catalogue`): what a service's handlers consume and may
//! produce, from the descriptors `#[effect_handler]` generates — as JSON Schema, and as a
//! Mermaid diagram of topics → handlers → schemas → topics, endpoints and entities.
//!
//! The shapes of effects schemas are known statically, so every effects schema gets a JSON
//! Schema of the effects document it produces without any help (its `datoms`, `requests` and
//! `messages` arrays, each slot with its cardinality). Payload types are the service's own: a
//! type whose JSON Schema should appear derives [`schemars::JsonSchema`] and is registered with
//! [`Catalogue::payload`] (or [`Catalogue::input`] for a handler's input); nothing forces the
//! others to. An unregistered payload is described by what its slot knows: a datom's entity and
//! attribute names, a message's topic, a request's method, endpoint and path.
//!
//! ```
//! use effects_core::catalogue::Catalogue;
//! use effects_core::{effect_handler, effects, Datom, Empty, Message};
//! use serde::{Deserialize, Serialize};
//!
//! use effects_core::catalogue::schemars::JsonSchema;
//!
//! #[derive(Deserialize, JsonSchema)]
//! #[schemars(crate = "effects_core::catalogue::schemars")]
//! pub struct Card { pub id: String }
//!
//! #[derive(Datom)]
//! #[datom(entity = "card")]
//! pub struct BlockedCard { #[datom(id)] pub id: String, pub status: String }
//!
//! #[derive(Serialize, Message, JsonSchema)]
//! #[schemars(crate = "effects_core::catalogue::schemars")]
//! #[message(topic = "card-status-changed")]
//! pub struct StatusChanged { #[message(key)] pub card_id: String }
//!
//! effects! {
//!     /// Blocking one card.
//!     pub BlockCard { datoms: [one BlockedCard], messages: [one StatusChanged] }
//! }
//!
//! #[effect_handler(topic = "card-block-requested")]
//! pub fn block(card: &Card) -> effects![BlockCard | Empty] {
//!     # let _ = card;
//!     Empty.into()
//! }
//!
//! let catalogue = Catalogue::new()
//!     .handler::<BlockHandler>()
//!     .input::<Card>()
//!     .payload::<StatusChanged>();
//! let json = catalogue.to_json();
//! assert_eq!(json["handlers"][0]["consumes"], "card-block-requested");
//! let schema = &json["schemas"]["BlockCard"];
//! assert_eq!(schema["properties"]["messages"]["minItems"], 1);
//! assert_eq!(json["payloads"]["StatusChanged"]["properties"]["card_id"]["type"], "string");
//!
//! let mermaid = catalogue.to_mermaid();
//! assert!(mermaid.contains(r#"topic_card_block_requested --> handler_block"#), "{mermaid}");
//! assert!(
//!     mermaid.contains(r#"schema_BlockCard -- "one StatusChanged" --> topic_card_status_changed"#),
//!     "{mermaid}"
//! );
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::{Map, Value, json};

pub use schemars;

use crate::handler::{Handler, HandlerDescriptor};
use crate::schema::{Cardinality, Matcher, Shape, SlotShape};

/// The JSON Schema dialect of every schema the catalogue writes.
pub const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// A service's handlers, their schemas and the payload types registered for them.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    handlers: Vec<&'static HandlerDescriptor>,
    payloads: BTreeMap<String, Value>,
}

/// The name a slot or descriptor uses for a type: the last path segment, generics kept.
fn short_name(name: &str) -> &str {
    let base = name.split('<').next().unwrap_or(name);
    match base.rfind("::") {
        Some(i) => &name[i + 2..],
        None => name,
    }
}

/// Something usable as a Mermaid node id.
fn node(prefix: &str, name: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + name.len() + 1);
    id.push_str(prefix);
    id.push('_');
    for c in name.chars() {
        id.push(if c.is_ascii_alphanumeric() { c } else { '_' });
    }
    id
}

/// A label in double quotes, with what Mermaid would misread escaped.
fn label(text: &str) -> String {
    let escaped = text.replace('"', "#quot;");
    format!("\"{escaped}\"")
}

fn bounds(cardinality: Cardinality) -> (u64, Option<u64>) {
    match cardinality {
        Cardinality::One => (1, Some(1)),
        Cardinality::Optional => (0, Some(1)),
        Cardinality::Many => (0, None),
        Cardinality::AtLeastOne => (1, None),
    }
}

impl Catalogue {
    /// An empty catalogue.
    pub fn new() -> Catalogue {
        Catalogue::default()
    }

    /// Adds a handler (its descriptor).
    #[must_use]
    pub fn handler<H: Handler>(self) -> Catalogue {
        self.descriptor(H::DESCRIPTOR)
    }

    /// Adds a handler by its descriptor.
    #[must_use]
    pub fn descriptor(mut self, descriptor: &'static HandlerDescriptor) -> Catalogue {
        if !self.handlers.iter().any(|d| d.name == descriptor.name) {
            self.handlers.push(descriptor);
        }
        self
    }

    /// Registers the JSON Schema of a payload type (a datom, message or request type named in
    /// a schema's slots), generated by schemars.
    #[must_use]
    pub fn payload<T: schemars::JsonSchema>(mut self) -> Catalogue {
        let name = short_name(std::any::type_name::<T>()).to_owned();
        let schema =
            schemars::SchemaGenerator::new(schemars::generate::SchemaSettings::draft2020_12())
                .into_root_schema_for::<T>();
        self.payloads.insert(name, schema.to_value());
        self
    }

    /// Registers the JSON Schema of a handler's input type. (The same as [`Catalogue::payload`]:
    /// inputs and payloads share one namespace of type names.)
    #[must_use]
    pub fn input<T: schemars::JsonSchema>(self) -> Catalogue {
        self.payload::<T>()
    }

    /// The registered handlers, in the order they were added.
    pub fn handlers(&self) -> &[&'static HandlerDescriptor] {
        &self.handlers
    }

    /// Every effects schema some handler may return, each once, by name.
    pub fn schemas(&self) -> BTreeMap<&'static str, &'static Shape> {
        self.handlers
            .iter()
            .flat_map(|d| d.schemas.iter().copied())
            .map(|s| (s.name, s))
            .collect()
    }

    /// The JSON Schema of what a payload type's slot holds in an effects document.
    fn slot_schema(&self, slot: &SlotShape) -> Value {
        let registered = self.payloads.get(short_name(slot.type_name));
        let reference = json!({"$ref": format!("#/$defs/{}", short_name(slot.type_name))});
        match slot.matcher {
            Matcher::Datom {
                identity,
                attributes,
            } => {
                // Attribute `card/status` holds what field `status` of the payload type holds.
                let mut properties = Map::new();
                for attribute in attributes {
                    let local = attribute.split_once('/').map_or(*attribute, |(_, l)| l);
                    let field = registered
                        .and_then(|s| s.get("properties"))
                        .and_then(|p| p.get(local))
                        .cloned()
                        .unwrap_or_else(|| json!({}));
                    properties.insert((*attribute).to_owned(), field);
                }
                json!({
                    "type": "object",
                    "description": format!("datom `{}`: attributes of an entity `[{identity} ..]`", slot.type_name),
                    "properties": {
                        "entity": {
                            "type": "array",
                            "prefixItems": [{"const": identity}, {}],
                            "items": false,
                            "minItems": 2,
                        },
                        "op": {"enum": ["assert", "retract"]},
                        "attributes": {
                            "type": "object",
                            "properties": Value::Object(properties),
                            "additionalProperties": false,
                        },
                        "expected": {"type": "object"},
                    },
                    "required": ["entity", "attributes"],
                    "additionalProperties": false,
                })
            }
            Matcher::Message { topic } => json!({
                "type": "object",
                "description": format!("message `{}` on topic `{topic}`", slot.type_name),
                "properties": {
                    "topic": {"const": topic},
                    "key": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "payload": reference,
                },
                "required": ["topic", "payload"],
                "additionalProperties": false,
            }),
            Matcher::Request {
                method,
                endpoint,
                path,
            } => json!({
                "type": "object",
                "description": format!("request `{}`: {method} {endpoint} {path}", slot.type_name),
                "properties": {
                    "method": {"const": method.to_string()},
                    "endpoint": {"const": endpoint},
                    "path": {"type": "string", "description": format!("the template `{path}`")},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": reference,
                },
                "required": ["method", "endpoint", "path"],
                "additionalProperties": false,
            }),
        }
    }

    /// The payload type's own JSON Schema: registered, or what its slot tells.
    fn payload_schema(&self, slot: &SlotShape) -> Value {
        if let Some(schema) = self.payloads.get(short_name(slot.type_name)) {
            let mut schema = schema.clone();
            if let Some(map) = schema.as_object_mut() {
                map.remove("$schema");
            }
            return schema;
        }
        let note = "not registered with the catalogue: derive `schemars::JsonSchema` and call \
                    `Catalogue::payload` for its schema";
        match slot.matcher {
            Matcher::Datom { attributes, .. } => {
                let properties: Map<String, Value> = attributes
                    .iter()
                    .map(|a| {
                        let local = a.split_once('/').map_or(*a, |(_, l)| l);
                        (local.to_owned(), json!({}))
                    })
                    .collect();
                json!({"title": slot.type_name, "type": "object", "properties": properties, "description": note})
            }
            _ => json!({"title": slot.type_name, "description": note}),
        }
    }

    /// The JSON Schema of the effects document an effects schema produces.
    pub fn schema_of(&self, shape: &Shape) -> Value {
        let mut defs = Map::new();
        let mut properties = Map::new();
        for (key, slots) in [
            ("datoms", shape.datoms),
            ("requests", shape.requests),
            ("messages", shape.messages),
        ] {
            let mut all_of = Vec::new();
            let mut any_of = Vec::new();
            let (mut min, mut max) = (0u64, Some(0u64));
            for slot in slots {
                let schema = self.slot_schema(slot);
                let name = short_name(slot.type_name).to_owned();
                defs.entry(name)
                    .or_insert_with(|| self.payload_schema(slot));
                let (lo, hi) = bounds(slot.cardinality);
                min += lo;
                max = max.zip(hi).map(|(a, b)| a + b);
                let mut contains = json!({"contains": schema, "minContains": lo});
                if let Some(hi) = hi {
                    contains["maxContains"] = json!(hi);
                }
                all_of.push(json!({
                    "description": format!("slot `{}`: {} {}", slot.name, slot.cardinality.keyword(), slot.type_name),
                }));
                if let (Some(last), Some(c)) = (all_of.last_mut(), contains.as_object()) {
                    if let Some(o) = last.as_object_mut() {
                        o.extend(c.clone());
                    }
                }
                any_of.push(schema);
            }
            let mut array = json!({"type": "array", "minItems": min});
            if let Some(max) = max {
                array["maxItems"] = json!(max);
            }
            if any_of.is_empty() {
                array["maxItems"] = json!(0);
            } else {
                array["items"] = json!({"anyOf": any_of});
                array["allOf"] = Value::Array(all_of);
            }
            properties.insert(key.to_owned(), array);
        }
        // A registered payload schema keeps the types it refers to in its own `$defs`, referred
        // to from its root (`#/$defs/CardStatus`): here that root is the effects schema's, so
        // they move up beside the payload.
        let mut nested = Map::new();
        for def in defs.values_mut() {
            if let Some(Value::Object(inner)) = def.as_object_mut().and_then(|d| d.remove("$defs"))
            {
                nested.extend(inner);
            }
        }
        for (name, def) in nested {
            defs.entry(name).or_insert(def);
        }
        let mut schema = json!({
            "$schema": DIALECT,
            "title": shape.name,
            "description": shape.doc.trim(),
            "type": "object",
            "properties": properties,
            "required": ["datoms", "requests", "messages"],
            "additionalProperties": false,
        });
        if !defs.is_empty() {
            schema["$defs"] = Value::Object(defs);
        }
        schema
    }

    /// The catalogue as JSON: `handlers` (name, topic consumed, business key, input, schemas),
    /// `schemas` (one JSON Schema per effects schema, with its shape under `x-effects-shape`),
    /// `payloads` (one JSON Schema per payload and input type), `inputs` (handler name to input
    /// type).
    pub fn to_json(&self) -> Value {
        let handlers: Vec<Value> = self
            .handlers
            .iter()
            .map(|d| {
                json!({
                    "name": d.name,
                    "consumes": d.topic,
                    "business_key": d.key,
                    "input": d.input,
                    "schemas": d.schemas.iter().map(|s| s.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut schemas = Map::new();
        let mut payloads = Map::new();
        for (name, shape) in self.schemas() {
            let mut schema = self.schema_of(shape);
            for slots in [shape.datoms, shape.requests, shape.messages] {
                for slot in slots {
                    payloads
                        .entry(short_name(slot.type_name).to_owned())
                        .or_insert_with(|| self.payload_schema(slot));
                }
            }
            schema["x-effects-shape"] = serde_json::to_value(shape).unwrap_or(Value::Null);
            schemas.insert(name.to_owned(), schema);
        }
        for d in &self.handlers {
            if let Some(schema) = self.payloads.get(short_name(d.input)) {
                let mut schema = schema.clone();
                if let Some(map) = schema.as_object_mut() {
                    map.remove("$schema");
                }
                payloads.entry(d.input.to_owned()).or_insert(schema);
            }
        }
        json!({
            "$schema": DIALECT,
            "handlers": handlers,
            "schemas": schemas,
            "payloads": payloads,
        })
    }

    /// The catalogue as a Mermaid flowchart: topics → handlers → schemas → what each schema
    /// produces (messages to topics, requests to endpoints, datoms to entities).
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        let mut topics: BTreeSet<&str> = BTreeSet::new();
        let mut endpoints: BTreeMap<String, String> = BTreeMap::new();
        let mut entities: BTreeSet<&str> = BTreeSet::new();
        let mut edges: Vec<String> = Vec::new();
        let mut handler_nodes = Vec::new();
        for d in &self.handlers {
            let h = node("handler", d.name);
            handler_nodes.push(format!(
                "    {h}[{}]\n",
                label(&format!("{}({})", d.name, d.input))
            ));
            if let Some(topic) = d.topic {
                topics.insert(topic);
                edges.push(format!("    {} --> {h}\n", node("topic", topic)));
            }
            for s in d.schemas {
                edges.push(format!("    {h} --> {}\n", node("schema", s.name)));
            }
        }
        let schemas = self.schemas();
        let mut schema_nodes = Vec::new();
        for (name, shape) in &schemas {
            let s = node("schema", name);
            schema_nodes.push(format!("    {s}{{{{{}}}}}\n", label(name)));
            let mut seen = BTreeSet::new();
            for slot in shape
                .datoms
                .iter()
                .chain(shape.requests)
                .chain(shape.messages)
            {
                let (target, text) = match slot.matcher {
                    Matcher::Datom { identity, .. } => {
                        let entity = identity.split_once('/').map_or(identity, |(e, _)| e);
                        entities.insert(entity);
                        (node("entity", entity), slot.type_name.to_owned())
                    }
                    Matcher::Message { topic } => {
                        topics.insert(topic);
                        (node("topic", topic), slot.type_name.to_owned())
                    }
                    Matcher::Request {
                        method,
                        endpoint,
                        path,
                    } => {
                        endpoints
                            .entry(endpoint.to_owned())
                            .or_insert_with(|| node("endpoint", endpoint));
                        (
                            node("endpoint", endpoint),
                            format!("{} {method} {path}", slot.type_name),
                        )
                    }
                };
                let edge = format!(
                    "    {s} -- {} --> {target}\n",
                    label(&format!("{} {text}", slot.cardinality.keyword()))
                );
                if seen.insert(edge.clone()) {
                    edges.push(edge);
                }
            }
        }
        for topic in &topics {
            let _ = writeln!(out, "    {}[/{}/]", node("topic", topic), label(topic));
        }
        for line in &handler_nodes {
            out.push_str(line);
        }
        for line in &schema_nodes {
            out.push_str(line);
        }
        for (name, id) in &endpoints {
            let _ = writeln!(out, "    {id}>{}]", label(&format!("endpoint {name}")));
        }
        for entity in &entities {
            let _ = writeln!(
                out,
                "    {}[({})]",
                node("entity", entity),
                label(&format!("{entity} entities"))
            );
        }
        for edge in &edges {
            out.push_str(edge);
        }
        out
    }
}
