//! The command registry: every command Strata answers, typed, with its JSON Schema.
//! (Interface fixed here; contents filled in by the control-plane work.)

use crate::error::CommandError;
use crate::events::EventBus;
use serde_json::Value;
use strata_engine::Graph;

/// All commands, dispatched by name. Owned by the admin thread.
#[derive(Debug)]
pub struct Registry {
    graph: Graph,
    events: EventBus,
    quit: bool,
}

impl Registry {
    pub fn new(graph: Graph, events: EventBus) -> Registry {
        Registry {
            graph,
            events,
            quit: false,
        }
    }

    /// Runs `method` with `params` (an object, or `null` for none).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CommandError> {
        let _ = (method, params, &self.events, &self.graph);
        todo!()
    }

    /// True once `quit` has run: the server answers it, then calls [`Registry::shutdown`].
    pub fn quit_requested(&self) -> bool {
        self.quit
    }

    /// Flushes and closes every node and stops the reactors.
    pub fn shutdown(self) {
        self.graph.shutdown();
    }
}
