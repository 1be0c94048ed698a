// Offers "Sign with my wallet" when the browser has an EIP-1193 wallet (window.ethereum); the signature can
// always be pasted instead. The message is signed exactly as shown (personal_sign), nothing else is sent.
(function () {
  const button = document.getElementById("sign-with-wallet");
  const message = document.getElementById("sign-in-message");
  const signature = document.getElementById("sign-in-signature");
  if (!button || !message || !window.ethereum) return;
  button.hidden = false;
  button.addEventListener("click", async () => {
    const address = message.value.split("\n")[1];
    try {
      signature.value = await window.ethereum.request({ method: "personal_sign", params: [message.value, address] });
      document.getElementById("signature-form").submit();
    } catch (error) {
      signature.placeholder = "the wallet did not sign: " + (error && error.message ? error.message : error);
    }
  });
})();
