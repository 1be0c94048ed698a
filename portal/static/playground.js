// The playground: streams an answer through the portal (which adds the viewer's key server-side), then
// polls the attribution of that answer and colours each token by the contributor holding most of it.
(function () {
  const form = document.getElementById("playground");
  if (!form) return;
  const answer = document.getElementById("answer");
  const status = document.getElementById("playground-status");
  const who = document.getElementById("answer-contributors");
  const traceLine = document.getElementById("answer-trace");

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  async function stream(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    let traceId = response.headers.get("x-attribution-trace-id") || "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        const data = event.replace(/^data: ?/, "");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        traceId = traceId || chunk.id;
        const choice = chunk.choices && chunk.choices[0];
        const text = choice && (choice.delta ? choice.delta.content : choice.text);
        if (text) answer.textContent += text;
      }
    }
    return traceId;
  }

  function colour(trace) {
    answer.textContent = "";
    for (const token of trace.tokens) {
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = token.text;
      span.dataset.index = token.index;
      span.dataset.contributor = token.contributor || "";
      span.dataset.weight = token.weight;
      if (token.contributor) {
        span.style.background = token.colour;
        span.title = token.contributor + ": " + token.weight.toFixed(3);
      }
      answer.appendChild(span);
    }
    who.textContent = "";
    for (const c of trace.contributors) {
      const row = who.insertRow();
      row.dataset.contributor = c.address;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = c.colour;
      const link = document.createElement("a");
      link.href = "/contributors/" + c.address;
      link.append(swatch, c.address);
      row.insertCell().append(link);
      row.insertCell().textContent = c.share.toFixed(4);
    }
    const link = document.createElement("a");
    link.href = "/traces/" + encodeURIComponent(trace.trace_id);
    link.id = "answer-trace-link";
    link.textContent = "Explore trace " + trace.trace_id;
    traceLine.replaceChildren(link);
  }

  async function attribution(traceId) {
    for (let attempt = 0; attempt < 120; attempt++) {
      const reply = await fetch("/api/traces/" + encodeURIComponent(traceId), { credentials: "same-origin" });
      if (reply.ok) return reply.json();
      if (reply.status !== 404 && reply.status !== 503) throw new Error((await reply.json()).error.message);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    throw new Error("the attribution did not arrive within a minute");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    answer.textContent = "";
    who.textContent = "";
    traceLine.textContent = "";
    setStatus("streaming", "answering…");
    try {
      const response = await fetch("/playground/chat", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", "x-csrf-token": form.dataset.csrf },
        body: JSON.stringify({
          model: document.getElementById("model").value,
          prompt: document.getElementById("prompt").value,
          max_tokens: Number(document.getElementById("max-tokens").value),
          mode: document.getElementById("mode").value,
        }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error((body.error && body.error.message) || "HTTP " + response.status);
      }
      const traceId = await stream(response);
      setStatus("attributing", "answered; waiting for its attribution…");
      colour(await attribution(traceId));
      setStatus("done", "attributed");
    } catch (error) {
      setStatus("failed", "failed: " + error.message);
    }
  });
})();
