//! Built-in plugins: crates linked into the axl binary register a constructor here, and the
//! host finds them by name. They implement the same [`Plugin`] trait as every other plugin
//! and are called directly, without a boundary to cross.

use crate::plugin::Plugin;

/// A plugin linked into the host.
pub struct BuiltinPlugin {
    /// The name configs use (`liger`).
    pub name: &'static str,
    /// Other names that select it, such as Axolotl's import path
    /// (`axolotl.integrations.liger.LigerPlugin`).
    pub aliases: &'static [&'static str],
    /// A new instance.
    pub create: fn() -> Box<dyn Plugin>,
}

inventory::collect!(BuiltinPlugin);

/// Every registered built-in plugin.
pub fn builtins() -> impl Iterator<Item = &'static BuiltinPlugin> {
    inventory::iter::<BuiltinPlugin>.into_iter()
}

/// Registers a plugin type (`Plugin + Default`) as a built-in under a name and aliases.
#[macro_export]
macro_rules! register_builtin {
    ($plugin:ty, $name:expr $(, aliases = [$($alias:expr),* $(,)?])? $(,)?) => {
        $crate::inventory::submit! {
            $crate::registry::BuiltinPlugin {
                name: $name,
                aliases: &[$($($alias),*)?],
                create: || ::std::boxed::Box::new(<$plugin as ::std::default::Default>::default()),
            }
        }
    };
}
