//! The handler catalogue of the cards service: the diagram the README shows, and JSON Schemas
//! whose references all resolve.

use serde_json::Value;

/// Every `$ref` in `value`, which must all point into `root`'s `$defs`.
fn unresolved(root: &Value, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let found = r
                    .strip_prefix("#/$defs/")
                    .and_then(|name| root.get("$defs")?.get(name));
                if found.is_none() {
                    out.push(r.clone());
                }
            }
            for v in map.values() {
                unresolved(root, v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| unresolved(root, v, out)),
        _ => {}
    }
}

#[test]
fn the_diagram() {
    insta::assert_snapshot!(cards::catalogue().to_mermaid());
}

#[test]
fn every_schema_is_self_contained_and_knows_its_payloads() {
    let json = cards::catalogue().to_json();
    let schemas = json["schemas"].as_object().expect("schemas");
    assert_eq!(
        schemas.keys().collect::<Vec<_>>(),
        ["BlockAll", "BlockCard", "Empty"]
    );
    let payloads = json["payloads"].as_object().expect("payloads");
    for (name, schema) in schemas.iter().chain(payloads) {
        let mut missing = Vec::new();
        unresolved(schema, schema, &mut missing);
        assert!(missing.is_empty(), "{name}: unresolved {missing:?}");
    }
    let block = &schemas["BlockCard"];
    assert_eq!(block["properties"]["datoms"]["minItems"], 1);
    assert_eq!(block["properties"]["datoms"]["maxItems"], 1);
    assert_eq!(
        block["properties"]["messages"]["items"]["anyOf"][0]["properties"]["topic"]["const"],
        "card-status-changed"
    );
    let all = &schemas["BlockAll"];
    assert_eq!(
        all["properties"]["messages"]["minItems"], 1,
        "one notification"
    );
    assert!(all["properties"]["messages"].get("maxItems").is_none());
    assert_eq!(schemas["Empty"]["properties"]["datoms"]["maxItems"], 0);
    assert_eq!(
        payloads["StatusChanged"]["properties"]["status"]["$ref"],
        "#/$defs/CardStatus"
    );
}
