// Loads the wasm UI; its start function mounts the app into <body>.
import init from "./attune_ui.js";

init().catch((err) => {
  document.body.textContent = "Attune's interface failed to load: " + err;
});
