//! `x-debug-block-user-add` / `x-debug-block-user-del`: named graph users that hold
//! permissions on a node, like a guest device or an export would (QEMU's BlockBackend).
//! A debugging and testing aid in the spirit of QEMU's `x-debug-*` commands: with them a
//! test can make a node hold `write` and watch image locks and permission conflicts.
//! Conflict messages name such a user `block device '<id>'`.

use super::block_graph::BlockPermission;
use super::command::Empty;
use super::context::{Ctx, DebugUser};
use crate::error::{CommandError, ErrorCode};
use schemars::JsonSchema;
use serde::Deserialize;

fn all_permissions() -> Vec<BlockPermission> {
    BlockPermission::list(strata_engine::Perm::ALL)
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserAdd {
    /// The user's name, unique among debugging users.
    pub id: String,
    /// The node it uses.
    pub node_name: String,
    /// What it does with the node.
    pub perm: Vec<BlockPermission>,
    /// What it lets others do (default: everything).
    #[serde(default = "all_permissions")]
    pub shared_perm: Vec<BlockPermission>,
}

pub fn user_add(ctx: &mut Ctx, p: UserAdd) -> Result<Empty, CommandError> {
    if ctx.users.contains_key(&p.id) {
        return Err(CommandError::invalid_params(format!(
            "A block device user with id '{}' already exists",
            p.id
        )));
    }
    let perm = BlockPermission::union(&p.perm);
    let shared = BlockPermission::union(&p.shared_perm);
    let desc = format!("block device '{}'", p.id);
    let (user, _) = ctx.change(|g| g.attach_user(desc, &p.node_name, perm, shared))?;
    ctx.users.insert(
        p.id,
        DebugUser {
            user,
            node_name: p.node_name,
            perm,
            shared,
        },
    );
    Ok(Empty {})
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserDel {
    /// The id given to x-debug-block-user-add.
    pub id: String,
}

pub fn user_del(ctx: &mut Ctx, p: UserDel) -> Result<Empty, CommandError> {
    let Some(u) = ctx.users.get(&p.id) else {
        return Err(CommandError::new(
            ErrorCode::NotFound,
            format!("No block device user with id '{}'", p.id),
        ));
    };
    let user = u.user;
    ctx.change(|g| g.detach_user(user))?;
    ctx.users.remove(&p.id);
    Ok(Empty {})
}
