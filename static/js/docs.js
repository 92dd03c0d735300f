// The API reference: "Copy" buttons put a code block's text on the clipboard, and a link to an
// operation or a schema opens its details.
function openTarget() {
  const id = decodeURIComponent(location.hash.slice(1));
  const details = id && document.getElementById(id)?.querySelector(":scope > details");
  if (details) details.open = true;
}
addEventListener("hashchange", openTarget);
openTarget();

const status = document.createElement("p");
status.className = "visually-hidden";
status.setAttribute("role", "status");
document.body.append(status);

for (const button of document.querySelectorAll("button.copy[data-copy]")) {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
      status.textContent = "Copied to the clipboard.";
    } catch {
      // No clipboard (http or a refusal): select the text so a keyboard copy works.
      const range = document.createRange();
      range.selectNodeContents(document.getElementById(button.dataset.copy));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      status.textContent = "Selected: press Ctrl+C or ⌘C to copy.";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  });
}
