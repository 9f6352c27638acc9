// Interop with Node.js amqplib (the client most JavaScript services use): declare, publish
// with confirms, consume and ack, nack with requeue, get, mandatory returns and errors.
// Usage: node amqplib_interop.js --port N. Exits non-zero with a message on the first failure.
'use strict';
const amqp = require('amqplib');
const assert = require('assert');

const port = process.argv[process.argv.indexOf('--port') + 1];
const url = `amqp://guest:guest@127.0.0.1:${port}/%2f`;

async function check(name, fn) {
  try {
    await fn();
    console.log(`ok ${name}`);
  } catch (e) {
    console.error(`FAIL ${name}: ${e && e.stack || e}`);
    process.exit(1);
  }
}

function nextMessage(ch, queue, opts) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no delivery from ${queue}`)), 5000);
    ch.consume(queue, (msg) => { clearTimeout(timer); resolve(msg); }, opts).catch(reject);
  });
}

(async () => {
  const timeout = setTimeout(() => { console.error('FAIL: timed out'); process.exit(1); }, 60000);
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();

  await check('declare exchange and queue, bind', async () => {
    await ch.assertExchange('js.x', 'topic', { durable: false });
    const q = await ch.assertQueue('js.q', { durable: false });
    assert.strictEqual(q.queue, 'js.q');
    await ch.bindQueue('js.q', 'js.x', 'orders.#');
    const anon = await ch.assertQueue('', { exclusive: true });
    assert.ok(anon.queue.startsWith('amq.gen-'), anon.queue);
  });

  await check('publish with confirms', async () => {
    for (let i = 0; i < 10; i++) {
      ch.publish('js.x', 'orders.new', Buffer.from(`m${i}`), {
        contentType: 'text/plain', headers: { n: i, tenant: 'acme' }, messageId: `id${i}`,
      });
    }
    await ch.waitForConfirms();
    const q = await ch.checkQueue('js.q');
    assert.strictEqual(q.messageCount, 10);
  });

  await check('get, properties and headers', async () => {
    const m = await ch.get('js.q', { noAck: false });
    assert.ok(m, 'a message');
    assert.strictEqual(m.content.toString(), 'm0');
    assert.strictEqual(m.properties.contentType, 'text/plain');
    assert.strictEqual(m.properties.headers.tenant, 'acme');
    assert.strictEqual(m.properties.headers.n, 0);
    assert.strictEqual(m.fields.messageCount, 9);
    ch.ack(m);
  });

  await check('nack with requeue comes back redelivered', async () => {
    const m = await ch.get('js.q', { noAck: false });
    assert.strictEqual(m.content.toString(), 'm1');
    ch.nack(m, false, true);
    const again = await ch.get('js.q', { noAck: false });
    assert.strictEqual(again.content.toString(), 'm1');
    assert.strictEqual(again.fields.redelivered, true);
    ch.ack(again);
  });

  await check('consume and ack in order', async () => {
    const got = [];
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`only ${got.length} delivered`)), 5000);
      ch.consume('js.q', (msg) => {
        got.push(msg.content.toString());
        ch.ack(msg);
        if (got.length === 8) { clearTimeout(timer); resolve(); }
      }, { consumerTag: 'js-consumer' }).catch(reject);
    });
    assert.deepStrictEqual(got, ['m2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8', 'm9']);
    await ch.cancel('js-consumer');
  });

  await check('mandatory unroutable publish is returned with 312', async () => {
    const returned = new Promise((resolve) => ch.once('return', resolve));
    ch.publish('js.x', 'nowhere', Buffer.from('lost'), { mandatory: true });
    const r = await returned;
    assert.strictEqual(r.fields.replyCode, 312);
    assert.strictEqual(r.fields.replyText, 'NO_ROUTE');
    assert.strictEqual(r.content.toString(), 'lost');
    await ch.waitForConfirms();
  });

  await check('get-empty', async () => {
    assert.strictEqual(await ch.get('js.q'), false);
  });

  await check('passive declare of a missing queue closes the channel with 404', async () => {
    const bad = await conn.createChannel();
    bad.on('error', () => {});
    await assert.rejects(bad.checkQueue('js.missing'), (e) => e.code === 404 && /NOT_FOUND - no queue 'js.missing'/.test(e.message));
  });

  await check('inequivalent redeclare closes the channel with 406', async () => {
    const bad = await conn.createChannel();
    bad.on('error', () => {});
    await assert.rejects(bad.assertExchange('js.x', 'direct'), (e) => e.code === 406 && /inequivalent arg 'type'/.test(e.message));
  });

  await check('the connection still works after channel errors', async () => {
    const again = await conn.createChannel();
    const q = await again.assertQueue('js.q', { durable: false });
    assert.strictEqual(q.messageCount, 0);
    await again.deleteQueue('js.q');
    await again.deleteExchange('js.x');
    await again.close();
  });

  await ch.close();
  await conn.close();
  clearTimeout(timeout);
  console.log('all amqplib checks passed');
})().catch((e) => { console.error(`FAIL: ${e && e.stack || e}`); process.exit(1); });
