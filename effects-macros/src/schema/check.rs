//! Rules across slots and schemas, one function per rule. Each records its errors in the context
//! and drops what it rejected, so the rest still expands and one mistake gives one error.

use std::collections::BTreeMap;

use crate::ctxt::Ctxt;
use crate::schema::ast::{Cardinality, Input, Kind, SchemaDef};

pub(crate) fn check(input: &mut Input, cx: &Ctxt) {
    unique_schema_names(input, cx);
    for schema in &mut input.schemas {
        one_slot_per_type(schema, cx);
        unique_method_names(schema, cx);
    }
}

fn unique_schema_names(input: &mut Input, cx: &Ctxt) {
    let mut seen = BTreeMap::new();
    input.schemas.retain(|schema| {
        let name = schema.name.to_string();
        let first = seen.insert(name.clone(), ()).is_none();
        if !first {
            cx.error_spanned_by(
                &schema.name,
                format!("schema `{name}` is declared twice: rename one of them"),
            );
        }
        first
    });
}

/// Two slots of one type would make every effect of that type ambiguous.
fn one_slot_per_type(schema: &mut SchemaDef, cx: &Ctxt) {
    let mut seen: BTreeMap<String, (Kind, Cardinality)> = BTreeMap::new();
    let name = &schema.name;
    schema.slots.retain(|slot| {
        let ty = slot.type_str();
        if let Some(&(kind, cardinality)) = seen.get(ty) {
            let fix = if kind == slot.kind {
                format!("for several, declare one slot `many {ty}`")
            } else {
                format!(
                    "a type is either a datom, a request or a message: remove it from `{}`",
                    slot.kind.key()
                )
            };
            cx.error_spanned_by(
                &slot.ty,
                format!(
                    "duplicate slot: `{ty}` already has a slot in `{name}` (`{} {ty}` in `{}`); {fix}",
                    cardinality.keyword(),
                    kind.key(),
                ),
            );
            false
        } else {
            seen.insert(ty.to_owned(), (slot.kind, slot.cardinality));
            true
        }
    });
}

/// The builder's methods are named after the slots; no two may collide, nor shadow `build`.
fn unique_method_names(schema: &mut SchemaDef, cx: &Ctxt) {
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    taken.insert("build".to_owned(), "the builder's `build()`".to_owned());
    schema.slots.retain(|slot| {
        let name = slot.name_str();
        let methods = builder_methods(slot.cardinality, name);
        let clash = methods.iter().find_map(|m| taken.get(m).map(|owner| (m, owner)));
        if let Some((method, owner)) = clash {
            let ty = slot.type_str();
            let card = slot.cardinality.keyword();
            cx.error_spanned_by(
                slot.rename.as_ref().map_or_else(
                    || { let t = &slot.ty; quote::quote!(#t) },
                    |r| quote::quote!(#r),
                ),
                format!(
                    "the builder method `{method}` of `{card} {ty}` clashes with {owner}: name the slot with `as`, as in `{card} {ty} as other_name`"
                ),
            );
            false
        } else {
            let owner = format!("the slot `{} {}`", slot.cardinality.keyword(), slot.type_str());
            for m in methods {
                taken.insert(m, owner.clone());
            }
            true
        }
    });
}

/// The builder methods a slot generates.
pub(crate) fn builder_methods(cardinality: Cardinality, name: &str) -> Vec<String> {
    match cardinality {
        Cardinality::One => vec![name.to_owned()],
        Cardinality::Optional => vec![name.to_owned(), format!("maybe_{name}")],
        Cardinality::Many | Cardinality::AtLeastOne => {
            vec![name.to_owned(), format!("extend_{name}")]
        }
    }
}
